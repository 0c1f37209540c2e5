/*
 * What the single-process C tests share: expect() checks a call's result
 * code (and that a failure carries a message) and counts failures; expert()
 * joins a 1 x 1 group as the expert from a thread, while the test's main
 * thread joins as the attention rank.
 */
#ifndef M2N_TEST_CHECK_H
#define M2N_TEST_CHECK_H

#include <m2n.h>

#include <stdio.h>

static int failures = 0;

static void expect(const char *what, m2n_result_t got, m2n_result_t want, const m2n_comm_t *comm) {
  const char *detail = m2n_comm_get_last_error(comm);
  if (got != want) {
    printf("FAIL %-48s got %d (%s), want %d (%s): %s\n", what, got, m2n_get_error_string(got), want,
           m2n_get_error_string(want), detail);
    failures++;
  } else if (want != M2N_SUCCESS && want != M2N_AGAIN && (detail == NULL || detail[0] == '\0')) {
    printf("FAIL %-48s returned %d without a message\n", what, got);
    failures++;
  } else {
    int quiet = want == M2N_SUCCESS || want == M2N_AGAIN; /* not failures: no message to show */
    printf("ok   %-48s %s%s%s\n", what, m2n_get_error_string(got), quiet ? "" : ": ", quiet ? "" : detail);
  }
}

struct expert_args {
  m2n_unique_id_t id;
  const m2n_config_t *cfg;
  m2n_comm_t *comm;
  m2n_result_t result;
};

static void *expert(void *p) {
  struct expert_args *a = p;
  a->result = m2n_comm_init(&a->comm, M2N_ROLE_EXPERT, 0, 1, 1, &a->id, a->cfg);
  return NULL;
}

#endif /* M2N_TEST_CHECK_H */
