/*
 * A 2 x 2 M2N exchange through the installed C library, every byte checked.
 *
 *   ./exchange [TRANSPORT]  launcher: creates the unique id (its root runs in
 *                           this process), starts 4 ranks of itself over
 *                           TRANSPORT (shm, the default; tcp; fabric), waits
 *   ./exchange ROLE RANK ID TRANSPORT  one rank (started by the launcher)
 *
 * Each attention rank dispatches ROUNDS rounds of a message per expert from a
 * buffer of m2n_mem_alloc; each expert checks every byte, answers each
 * attention rank on combine from application memory registered with
 * m2n_reg_mem, and the attention ranks check those bytes too.
 */
#include <m2n.h>

#include "transport.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define M 2
#define N 2
#define ROUNDS 500
#define BYTES 4099
#define TIMEOUT_MS 20000

#define CHECK(call)                                                                            \
  do {                                                                                         \
    m2n_result_t r_ = (call);                                                                  \
    if (r_ != M2N_SUCCESS) {                                                                   \
      fprintf(stderr, "%s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #call,                      \
              m2n_get_error_string(r_), m2n_comm_get_last_error(comm));                        \
      exit(3);                                                                                 \
    }                                                                                          \
  } while (0)

static uint8_t pattern(int channel, int sender, int receiver, uint64_t round, size_t i) {
  return (uint8_t)(channel * 101 + sender * 37 + receiver * 11 + round * 7 + i * 13 + (i >> 8));
}

static void fill(uint8_t *p, int channel, int s, int r, uint64_t round) {
  for (size_t i = 0; i < BYTES; i++) p[i] = pattern(channel, s, r, round, i);
}

static long check(const uint8_t *p, size_t len, int channel, int s, int r, uint64_t round) {
  if (len != BYTES) return BYTES;
  long wrong = 0;
  for (size_t i = 0; i < len; i++) wrong += p[i] != pattern(channel, s, r, round, i);
  return wrong;
}

static int rank_main(int role, int rank, const char *id_text, const char *transport) {
  m2n_comm_t *comm = NULL;
  m2n_unique_id_t id;
  m2n_config_t cfg;
  CHECK(m2n_unique_id_from_string(id_text, &id));
  CHECK(m2n_config_init(&cfg, sizeof cfg));
  cfg.transport = (m2n_transport_t)transport_named(transport);
  cfg.dispatch_slot_bytes = BYTES;
  cfg.combine_slot_bytes = BYTES;
  CHECK(m2n_comm_init(&comm, role, rank, M, N, &id, &cfg));
  long wrong = 0;
  if (role == M2N_ROLE_ATTENTION) {
    m2n_mem_t *mem;
    void *ptr;
    CHECK(m2n_mem_alloc(comm, (size_t)N * BYTES, &mem, &ptr));
    for (uint64_t k = 0; k < ROUNDS; k++) {
      m2n_msg_t msgs[N];
      for (int e = 0; e < N; e++) {
        fill((uint8_t *)ptr + (size_t)e * BYTES, 0, rank, e, k);
        msgs[e] = (m2n_msg_t){mem, (size_t)e * BYTES, BYTES};
      }
      uint64_t posted;
      CHECK(m2n_send(comm, msgs, N, TIMEOUT_MS, &posted));
      CHECK(m2n_wait_send(comm, posted, TIMEOUT_MS));
      m2n_round_t *round;
      CHECK(m2n_wait_recv(comm, TIMEOUT_MS, &round));
      uint64_t number;
      CHECK(m2n_round_number(comm, round, &number));
      if (number != k) wrong++;
      for (int e = 0; e < N; e++) {
        const void *data;
        size_t len;
        CHECK(m2n_round_data(comm, round, e, &data, &len));
        wrong += check(data, len, 1, e, rank, k);
      }
      CHECK(m2n_round_release(comm, round));
    }
    CHECK(m2n_dereg_mem(comm, mem));
  } else {
    uint8_t *answer = malloc((size_t)M * BYTES); /* application memory */
    m2n_mem_t *mem;
    CHECK(m2n_reg_mem(comm, answer, (size_t)M * BYTES, &mem));
    for (uint64_t k = 0; k < ROUNDS; k++) {
      m2n_round_t *round;
      CHECK(m2n_wait_recv(comm, TIMEOUT_MS, &round));
      for (int a = 0; a < M; a++) {
        const void *data;
        size_t len;
        CHECK(m2n_round_data(comm, round, a, &data, &len));
        wrong += check(data, len, 0, a, rank, k);
      }
      CHECK(m2n_round_release(comm, round));
      m2n_msg_t msgs[M];
      for (int a = 0; a < M; a++) {
        fill(answer + (size_t)a * BYTES, 1, rank, a, k);
        msgs[a] = (m2n_msg_t){mem, (size_t)a * BYTES, BYTES};
      }
      uint64_t posted;
      CHECK(m2n_send(comm, msgs, M, TIMEOUT_MS, &posted));
      CHECK(m2n_wait_send(comm, posted, TIMEOUT_MS));
    }
    CHECK(m2n_dereg_mem(comm, mem));
    free(answer);
  }
  CHECK(m2n_comm_destroy(comm));
  printf("%s %d: %d rounds, %ld wrong bytes\n", role == M2N_ROLE_ATTENTION ? "attention" : "expert", rank,
         ROUNDS, wrong);
  return wrong == 0 ? 0 : 2;
}

int main(int argc, char **argv) {
  if (argc == 5) return rank_main(atoi(argv[1]), atoi(argv[2]), argv[3], argv[4]);
  const char *transport = argc == 2 ? argv[1] : "shm";
  if (argc > 2 || transport_named(transport) < 0) {
    fprintf(stderr, "usage: %s [shm|tcp|fabric]\n", argv[0]);
    return 2;
  }
  const m2n_comm_t *comm = NULL; /* for CHECK's message */
  int major, minor, patch;
  CHECK(m2n_get_version(&major, &minor, &patch));
  m2n_unique_id_t id;
  CHECK(m2n_get_unique_id(&id));
  printf("m2n %d.%d.%d over %s, unique id %s\n", major, minor, patch, transport, id.internal);
  fflush(stdout);
  pid_t pids[M + N];
  for (int i = 0; i < M + N; i++) {
    char role[4], rank[8];
    snprintf(role, sizeof role, "%d", i < M ? M2N_ROLE_ATTENTION : M2N_ROLE_EXPERT);
    snprintf(rank, sizeof rank, "%d", i < M ? i : i - M);
    pids[i] = fork();
    if (pids[i] == 0) {
      execl("/proc/self/exe", argv[0], role, rank, id.internal, transport, (char *)NULL);
      perror("execl");
      _exit(127);
    }
  }
  int failed = 0;
  for (int i = 0; i < M + N; i++) {
    int status;
    waitpid(pids[i], &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
  }
  printf(failed ? "exchange: %d ranks failed\n" : "exchange: all ranks passed%.0d\n", failed);
  return failed ? 1 : 0;
}
