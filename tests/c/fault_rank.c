/*
 * One rank of a fault-campaign group driven through the C ABI, the way
 * m2n-demo's worker drives the Rust API (scripts/fault-matrix runs both):
 * attention ranks post dispatch rounds and check the combine rounds that
 * come back, experts check dispatch rounds and answer; every byte checked.
 *
 *   fault_rank ROLE RANK M N ROUNDS BYTES blocking|nonblocking HOLD HOLD_AFTER TIMEOUT_S
 *
 * ROLE is attention or expert; HOLD is none, bootstrap, dispatch, combine,
 * holding or destroy (where to stop after HOLD_AFTER rounds and wait for a
 * signal, as m2n-demo's --hold). The unique id comes from M2N_UNIQUE_ID;
 * M2N_* variables apply. Prints M2N-READY, M2N-PHASE, M2N-RESULT or
 * M2N-ERROR <kind>: <message> followed by M2N-WRONG <bytes>.
 */
#include <m2n.h>

#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *hold = "none";
static uint64_t hold_after = 0;
static int nonblocking = 0;
static int timeout_ms = 30000;
static size_t wrong = 0;
static const char *who = "?";
static m2n_comm_t *comm = NULL;

static void park(const char *phase) {
  printf("M2N-PHASE %s\n", phase);
  fflush(stdout);
  for (;;) sleep(1);
}

static void hold_here(const char *phase, uint64_t round) {
  if (strcmp(hold, phase) == 0 && round == hold_after) park(phase);
}

static int fail(m2n_result_t r) {
  const char *kind = r == M2N_ERR_PEER_LOST ? "peer-lost"
                     : r == M2N_ERR_TIMEOUT ? "timeout"
                     : r == M2N_ERR_BOOTSTRAP ? "bootstrap"
                     : r == M2N_ERR_CONFIG ? "config"
                     : r == M2N_ERR_PROTOCOL ? "protocol"
                                             : "other";
  printf("M2N-ERROR %s: %s: %s\n", kind, who, m2n_comm_get_last_error(comm));
  printf("M2N-WRONG %zu\n", wrong);
  fflush(stdout);
  return 3;
}

#define CHECK(call)                      \
  do {                                   \
    m2n_result_t r_ = (call);            \
    if (r_ != M2N_SUCCESS) return fail(r_); \
  } while (0)

static uint8_t byte_of(uint64_t round, int sender, int receiver, int channel, size_t i) {
  return (uint8_t)(round * 7 + (uint64_t)sender * 13 + (uint64_t)receiver * 29 + (uint64_t)channel * 101 + i);
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* The next round, blocking or by polling test_recv + progress. */
static m2n_result_t recv_round(m2n_round_t **round) {
  if (!nonblocking) return m2n_wait_recv(comm, timeout_ms, round);
  double end = now_ms() + timeout_ms;
  for (;;) {
    m2n_result_t r = m2n_test_recv(comm, round);
    if (r != M2N_AGAIN) return r;
    r = m2n_progress(comm);
    if (r != M2N_SUCCESS) return r;
    if (now_ms() > end) return M2N_ERR_TIMEOUT;
    sched_yield();
  }
}

static m2n_result_t send_round(const m2n_msg_t *msgs, int count, uint64_t *round) {
  if (!nonblocking) return m2n_send(comm, msgs, count, timeout_ms, round);
  double end = now_ms() + timeout_ms;
  for (;;) {
    m2n_result_t r = m2n_send(comm, msgs, count, 0, round);
    if (r != M2N_AGAIN) return r;
    r = m2n_progress(comm);
    if (r != M2N_SUCCESS) return r;
    if (now_ms() > end) return M2N_ERR_TIMEOUT;
    sched_yield();
  }
}

static m2n_result_t wait_sent(uint64_t round) {
  if (!nonblocking) return m2n_wait_send(comm, round, timeout_ms);
  double end = now_ms() + timeout_ms;
  for (;;) {
    int done = 0;
    m2n_result_t r = m2n_test_send(comm, round, &done);
    if (r != M2N_SUCCESS || done) return r;
    r = m2n_progress(comm);
    if (r != M2N_SUCCESS) return r;
    if (now_ms() > end) return M2N_ERR_TIMEOUT;
    sched_yield();
  }
}

/* Checks every peer's message of a received round. */
static void check(m2n_round_t *round, int peers, int me, int channel, size_t bytes, int i_am_sender_side) {
  uint64_t number = 0;
  m2n_round_number(comm, round, &number);
  for (int p = 0; p < peers; p++) {
    const void *data = NULL;
    size_t len = 0;
    if (m2n_round_data(comm, round, p, &data, &len) != M2N_SUCCESS || len != bytes) {
      wrong += bytes ? bytes : 1;
      continue;
    }
    const uint8_t *b = data;
    int sender = i_am_sender_side ? me : p, receiver = i_am_sender_side ? p : me;
    for (size_t i = 0; i < len; i++) wrong += b[i] != byte_of(number, sender, receiver, channel, i);
  }
}

int main(int argc, char **argv) {
  if (argc != 11) {
    fprintf(stderr, "usage: fault_rank ROLE RANK M N ROUNDS BYTES blocking|nonblocking HOLD HOLD_AFTER TIMEOUT_S\n");
    return 2;
  }
  int attention = strcmp(argv[1], "attention") == 0;
  int rank = atoi(argv[2]), m = atoi(argv[3]), n = atoi(argv[4]);
  uint64_t rounds = strtoull(argv[5], NULL, 10);
  size_t bytes = strtoull(argv[6], NULL, 10);
  nonblocking = strcmp(argv[7], "nonblocking") == 0;
  hold = argv[8];
  hold_after = strtoull(argv[9], NULL, 10);
  timeout_ms = atoi(argv[10]) * 1000;
  static char name[64];
  snprintf(name, sizeof name, "%s %d", attention ? "attention" : "expert", rank);
  who = name;

  const char *text = getenv("M2N_UNIQUE_ID");
  m2n_unique_id_t id;
  m2n_config_t cfg;
  if (!text) {
    fprintf(stderr, "M2N_UNIQUE_ID is not set\n");
    return 2;
  }
  CHECK(m2n_unique_id_from_string(text, &id));
  CHECK(m2n_config_init(&cfg, sizeof cfg));
  cfg.dispatch_slot_bytes = cfg.combine_slot_bytes = bytes;
  cfg.dispatch_depth = cfg.combine_depth = 2;
  if (strcmp(hold, "bootstrap") == 0) park("bootstrap");
  CHECK(m2n_comm_init(&comm, attention ? M2N_ROLE_ATTENTION : M2N_ROLE_EXPERT, rank, m, n, &id, &cfg));
  printf("M2N-READY %s pid=%d\n", who, (int)getpid());
  fflush(stdout);

  int peers = attention ? n : m;
  m2n_mem_t *mem = NULL;
  uint8_t *buf = NULL;
  CHECK(m2n_mem_alloc(comm, bytes * peers + 1, &mem, (void **)&buf));
  m2n_msg_t *msgs = calloc(peers, sizeof *msgs);
  for (uint64_t k = 0; k < rounds; k++) {
    m2n_round_t *got = NULL;
    uint64_t sent = 0;
    if (attention) {
      for (int p = 0; p < peers; p++) {
        for (size_t i = 0; i < bytes; i++) buf[p * bytes + i] = byte_of(k, rank, p, 0, i);
        msgs[p] = (m2n_msg_t){mem, p * bytes, bytes};
      }
      CHECK(send_round(msgs, peers, &sent));
      hold_here("dispatch", k);
      CHECK(recv_round(&got));
      check(got, peers, rank, 1, bytes, 0);
      hold_here("holding", k);
      CHECK(m2n_round_release(comm, got));
      hold_here("combine", k);
      /* The buffer is rewritten next round: its writes must have left. */
      CHECK(wait_sent(sent));
    } else {
      CHECK(recv_round(&got));
      check(got, peers, rank, 0, bytes, 0);
      hold_here("holding", k);
      CHECK(m2n_round_release(comm, got));
      hold_here("dispatch", k);
      for (int p = 0; p < peers; p++) {
        for (size_t i = 0; i < bytes; i++) buf[p * bytes + i] = byte_of(k, rank, p, 1, i);
        msgs[p] = (m2n_msg_t){mem, p * bytes, bytes};
      }
      CHECK(send_round(msgs, peers, &sent));
      hold_here("combine", k);
      CHECK(wait_sent(sent));
    }
  }
  printf("M2N-RESULT %s wrong=%zu\n", who, wrong);
  if (strcmp(hold, "destroy") == 0) printf("M2N-PHASE destroy\n");
  fflush(stdout);
  CHECK(m2n_comm_destroy(comm));
  free(msgs);
  return wrong ? 2 : 0;
}
