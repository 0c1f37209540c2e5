/*
 * The transport a multi-process C test runs over, named on its command
 * line: shm, tcp or fabric (libfabric; the provider from M2N_FI_PROVIDER,
 * as the library reads it).
 */
#ifndef M2N_TEST_TRANSPORT_H
#define M2N_TEST_TRANSPORT_H

#include <m2n.h>

#include <string.h>

/* The m2n_transport_t named `name`, or -1. */
static inline int transport_named(const char *name) {
  if (strcmp(name, "shm") == 0) return M2N_TRANSPORT_SHM;
  if (strcmp(name, "tcp") == 0) return M2N_TRANSPORT_TCP;
  if (strcmp(name, "fabric") == 0) return M2N_TRANSPORT_FABRIC;
  return -1;
}

#endif
