/*
 * A lost peer is reported on the non-blocking paths of the installed C
 * library, as on the blocking ones.
 *
 *   ./peer_lost shm|tcp|fabric   launcher: a 3 x 2 group of ranks of itself;
 *                                 when all run, it kills expert 1 (SIGKILL)
 *   ./peer_lost ROLE RANK ID T   one rank
 *
 * Expert 0 and attention 2 drive m2n as an event loop does: m2n_send with
 * no wait, m2n_test_send, m2n_test_recv and m2n_progress, never a blocking
 * call. Every survivor must end with M2N_ERR_PEER_LOST from some call
 * within the peer timeout (exit 0); one that keeps spinning is a failure.
 */
#include <m2n.h>

#include "transport.h"

#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define M 3
#define N 2
#define BYTES 65536
#define TIMEOUT_MS 20000

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* Ends the rank: PEER_LOST is what we are here for. */
static void finish(const m2n_comm_t *comm, const char *who, const char *call, m2n_result_t r) {
  if (r == M2N_ERR_PEER_LOST) {
    printf("%s: %s: M2N_ERR_PEER_LOST (%s)\n", who, call, m2n_comm_get_last_error(comm));
    fflush(stdout);
    exit(0);
  }
  fprintf(stderr, "%s: %s: %s (%s)\n", who, call, m2n_get_error_string(r), m2n_comm_get_last_error(comm));
  exit(3);
}

#define CALL(call)                                                   \
  do {                                                               \
    m2n_result_t r_ = (call);                                        \
    if (r_ != M2N_SUCCESS && r_ != M2N_AGAIN) finish(comm, who, #call, r_); \
  } while (0)

static int rank_main(int role, int rank, const char *id_text, const char *transport) {
  m2n_comm_t *comm = NULL;
  char who[32];
  snprintf(who, sizeof who, "%s %d", role == M2N_ROLE_ATTENTION ? "attention" : "expert", rank);
  m2n_unique_id_t id;
  m2n_config_t cfg;
  CALL(m2n_unique_id_from_string(id_text, &id));
  CALL(m2n_config_init(&cfg, sizeof cfg));
  cfg.transport = (m2n_transport_t)transport_named(transport);
  cfg.dispatch_slot_bytes = BYTES;
  cfg.combine_slot_bytes = BYTES;
  CALL(m2n_comm_init(&comm, role, rank, M, N, &id, &cfg));
  int polling = (role == M2N_ROLE_EXPERT && rank == 0) || (role == M2N_ROLE_ATTENTION && rank == 2);
  int peers = role == M2N_ROLE_ATTENTION ? N : M;
  m2n_mem_t *mem;
  void *ptr;
  CALL(m2n_mem_alloc(comm, (size_t)peers * BYTES, &mem, &ptr));
  memset(ptr, rank, (size_t)peers * BYTES);
  m2n_msg_t msgs[M > N ? M : N];
  for (int p = 0; p < peers; p++) msgs[p] = (m2n_msg_t){mem, (size_t)p * BYTES, BYTES};
  printf("%s: running (%s)\n", who, polling ? "polling" : "blocking");
  fflush(stdout);
  double started = now_s();
  for (uint64_t k = 0;; k++) {
    if (now_s() - started > 60) {
      fprintf(stderr, "%s: still running after 60 s: no error was ever reported\n", who);
      return 4;
    }
    if (role == M2N_ROLE_ATTENTION) {
      uint64_t posted;
      if (polling) {
        m2n_result_t r;
        while ((r = m2n_send(comm, msgs, N, 0, &posted)) == M2N_AGAIN) CALL(m2n_progress(comm));
        if (r != M2N_SUCCESS) finish(comm, who, "m2n_send", r);
        int done = 0;
        while (!done) {
          CALL(m2n_test_send(comm, posted, &done));
          if (!done) CALL(m2n_progress(comm));
        }
        m2n_round_t *round = NULL;
        while (round == NULL) {
          CALL(m2n_test_recv(comm, &round));
          if (round == NULL) CALL(m2n_progress(comm));
        }
        CALL(m2n_round_release(comm, round));
      } else {
        CALL(m2n_send(comm, msgs, N, TIMEOUT_MS, &posted));
        CALL(m2n_wait_send(comm, posted, TIMEOUT_MS));
        m2n_round_t *round;
        CALL(m2n_wait_recv(comm, TIMEOUT_MS, &round));
        CALL(m2n_round_release(comm, round));
      }
    } else {
      m2n_round_t *round = NULL;
      if (polling) {
        while (round == NULL) {
          CALL(m2n_test_recv(comm, &round));
          if (round == NULL) CALL(m2n_progress(comm));
        }
      } else {
        CALL(m2n_wait_recv(comm, TIMEOUT_MS, &round));
      }
      CALL(m2n_round_release(comm, round));
      uint64_t posted;
      if (polling) {
        m2n_result_t r;
        while ((r = m2n_send(comm, msgs, M, 0, &posted)) == M2N_AGAIN) CALL(m2n_progress(comm));
        if (r != M2N_SUCCESS) finish(comm, who, "m2n_send", r);
        int done = 0;
        while (!done) {
          CALL(m2n_test_send(comm, posted, &done));
          if (!done) CALL(m2n_progress(comm));
        }
      } else {
        CALL(m2n_send(comm, msgs, M, TIMEOUT_MS, &posted));
        CALL(m2n_wait_send(comm, posted, TIMEOUT_MS));
      }
    }
  }
}

int main(int argc, char **argv) {
  if (argc == 5) return rank_main(atoi(argv[1]), atoi(argv[2]), argv[3], argv[4]);
  if (argc != 2 || transport_named(argv[1]) < 0) {
    fprintf(stderr, "usage: %s shm|tcp|fabric\n", argv[0]);
    return 2;
  }
  const m2n_comm_t *comm = NULL;
  const char *who = "launcher";
  m2n_unique_id_t id;
  CALL(m2n_get_unique_id(&id));
  int out[2];
  if (pipe(out) != 0) return 2;
  pid_t pids[M + N];
  for (int i = 0; i < M + N; i++) {
    char role[4], rank[8];
    snprintf(role, sizeof role, "%d", i < M ? M2N_ROLE_ATTENTION : M2N_ROLE_EXPERT);
    snprintf(rank, sizeof rank, "%d", i < M ? i : i - M);
    pids[i] = fork();
    if (pids[i] == 0) {
      dup2(out[1], 1);
      execl("/proc/self/exe", argv[0], role, rank, id.internal, argv[1], (char *)NULL);
      _exit(127);
    }
  }
  close(out[1]);
  FILE *lines = fdopen(out[0], "r");
  char line[512];
  int running = 0;
  while (running < M + N && fgets(line, sizeof line, lines)) {
    fputs(line, stdout);
    if (strstr(line, ": running")) running++;
  }
  usleep(300 * 1000);
  pid_t victim = pids[M + 1]; /* expert 1 */
  kill(victim, SIGKILL);
  double killed = now_s();
  waitpid(victim, NULL, 0);
  int failed = 0;
  for (int i = 0; i < M + N; i++) {
    if (pids[i] == victim) continue;
    int status = -1;
    while (waitpid(pids[i], &status, WNOHANG) == 0) {
      if (now_s() - killed > 20) {
        kill(pids[i], SIGKILL);
        waitpid(pids[i], &status, 0);
        fprintf(stderr, "peer_lost: rank %d hung after the kill\n", i);
        failed++;
        status = 0;
        break;
      }
      usleep(10 * 1000);
    }
    if (status != 0 && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) failed++;
  }
  while (fgets(line, sizeof line, lines)) fputs(line, stdout);
  printf(failed ? "peer_lost (%s): %d survivors failed\n" : "peer_lost (%s): every survivor reported the lost peer%.0d\n",
         argv[1], failed);
  return failed ? 1 : 0;
}
