/*
 * Every misuse of the C API returns the documented error code with a
 * message, and the process survives: NULL pointers, wrong sizes, configs
 * of another size or version, bad roles and ranks, invalid and destroyed
 * handles, calls in the wrong order.
 */
#include <m2n.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

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
    printf("ok   %-48s %s%s%s\n", what, m2n_get_error_string(got), want == M2N_SUCCESS ? "" : ": ",
           want == M2N_SUCCESS ? "" : detail);
  }
}

struct expert_args {
  m2n_unique_id_t id;
  m2n_comm_t *comm;
  m2n_result_t result;
};

static void *expert(void *p) {
  struct expert_args *a = p;
  a->result = m2n_comm_init(&a->comm, M2N_ROLE_EXPERT, 0, 1, 1, &a->id, NULL);
  return NULL;
}

int main(void) {
  m2n_config_t cfg;
  m2n_unique_id_t id;
  m2n_comm_t *comm = NULL;

  expect("version with NULL outputs", m2n_get_version(NULL, NULL, NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("config_init with NULL", m2n_config_init(NULL, sizeof cfg), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("config_init with a wrong size", m2n_config_init(&cfg, sizeof cfg - 4), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("config_init", m2n_config_init(&cfg, sizeof cfg), M2N_SUCCESS, NULL);
  expect("unique id from garbage", m2n_unique_id_from_string("nccl-id", &id), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("unique id from NULL", m2n_unique_id_from_string(NULL, &id), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("get_unique_id NULL", m2n_get_unique_id(NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("get_unique_id", m2n_get_unique_id(&id), M2N_SUCCESS, NULL);

  expect("comm_init NULL out", m2n_comm_init(NULL, 0, 0, 1, 1, &id, NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("comm_init bad role", m2n_comm_init(&comm, 7, 0, 1, 1, &id, NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("comm_init negative rank", m2n_comm_init(&comm, 0, -1, 1, 1, &id, NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("comm_init rank out of range", m2n_comm_init(&comm, 0, 3, 1, 1, &id, NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("comm_init NULL id", m2n_comm_init(&comm, 0, 0, 1, 1, NULL, NULL), M2N_ERR_INVALID_ARGUMENT, NULL);
  m2n_config_t old = cfg;
  old.size = sizeof cfg - 8;
  expect("comm_init config of another size", m2n_comm_init(&comm, 0, 0, 1, 1, &id, &old), M2N_ERR_INVALID_ARGUMENT, NULL);
  old = cfg;
  old.version = 99;
  expect("comm_init config of another version", m2n_comm_init(&comm, 0, 0, 1, 1, &id, &old), M2N_ERR_INVALID_ARGUMENT, NULL);
  old = cfg;
  old.transport = 42;
  expect("comm_init unknown transport", m2n_comm_init(&comm, 0, 0, 1, 1, &id, &old), M2N_ERR_CONFIG, NULL);
  old = cfg;
  old.dispatch_depth = 0;
  expect("comm_init depth 0", m2n_comm_init(&comm, 0, 0, 1, 1, &id, &old), M2N_ERR_CONFIG, NULL);

  /* A real 1 x 1 group: attention here, expert in a thread. */
  cfg.transport = M2N_TRANSPORT_SHM;
  cfg.dispatch_slot_bytes = 64;
  cfg.combine_slot_bytes = 64;
  cfg.dispatch_depth = 1;
  cfg.peer_timeout_ms = 2000;
  struct expert_args ex = {.id = id};
  pthread_t t;
  pthread_create(&t, NULL, expert, &ex);
  expect("comm_init attention", m2n_comm_init(&comm, M2N_ROLE_ATTENTION, 0, 1, 1, &id, &cfg), M2N_SUCCESS, NULL);
  pthread_join(t, NULL);
  expect("comm_init expert (thread)", ex.result, M2N_SUCCESS, NULL);

  m2n_mem_t *mem = NULL;
  void *ptr = NULL;
  uint64_t round = 0;
  int done = 0;
  m2n_round_t *r = NULL;
  expect("mem_alloc NULL outputs", m2n_mem_alloc(comm, 64, NULL, NULL), M2N_ERR_INVALID_ARGUMENT, comm);
  expect("mem_alloc", m2n_mem_alloc(comm, 128, &mem, &ptr), M2N_SUCCESS, comm);
  expect("reg_mem NULL pointer", m2n_reg_mem(comm, NULL, 16, &mem), M2N_ERR_INVALID_ARGUMENT, comm);
  m2n_msg_t too_big = {mem, 0, 65};
  expect("send over the slot size", m2n_send(comm, &too_big, 1, 0, &round), M2N_ERR_INVALID_ARGUMENT, comm);
  m2n_msg_t outside = {mem, 100, 60};
  expect("send outside the buffer", m2n_send(comm, &outside, 1, 0, &round), M2N_ERR_INVALID_ARGUMENT, comm);
  m2n_msg_t two[2] = {{mem, 0, 1}, {mem, 1, 1}};
  expect("send with a wrong message count", m2n_send(comm, two, 2, 0, &round), M2N_ERR_INVALID_ARGUMENT, comm);
  m2n_msg_t forged = {(const m2n_mem_t *)0x1234560, 0, 1};
  expect("send from a forged buffer", m2n_send(comm, &forged, 1, 0, &round), M2N_ERR_INVALID_USAGE, comm);
  expect("send with NULL msgs", m2n_send(comm, NULL, 1, 0, &round), M2N_ERR_INVALID_ARGUMENT, comm);
  expect("wait_send of a round never posted", m2n_wait_send(comm, 5, 100), M2N_ERR_INVALID_ARGUMENT, comm);
  m2n_msg_t ok = {mem, 0, 8};
  expect("send round 0", m2n_send(comm, &ok, 1, 1000, &round), M2N_SUCCESS, comm);
  expect("send round 1: window full (depth 1)", m2n_send(comm, &ok, 1, 0, &round), M2N_AGAIN, comm);
  expect("send round 1 waits, expert never releases", m2n_send(comm, &ok, 1, 200, &round), M2N_ERR_TIMEOUT, comm);
  expect("test_send NULL out", m2n_test_send(comm, 0, NULL), M2N_ERR_INVALID_ARGUMENT, comm);
  expect("test_send", m2n_test_send(comm, 0, &done), M2N_SUCCESS, comm);
  expect("test_recv on nothing yet", m2n_test_recv(comm, &r), M2N_AGAIN, comm);
  expect("wait_recv times out", m2n_wait_recv(comm, 100, &r), M2N_ERR_TIMEOUT, comm);
  expect("round_release of a forged round", m2n_round_release(comm, (m2n_round_t *)0x5550), M2N_ERR_INVALID_USAGE, comm);
  expect("round_data of a forged round", m2n_round_data(comm, (m2n_round_t *)0x5550, 0, NULL, NULL), M2N_ERR_INVALID_USAGE, comm);
  expect("dereg_mem", m2n_dereg_mem(comm, mem), M2N_SUCCESS, comm);
  expect("dereg_mem twice", m2n_dereg_mem(comm, mem), M2N_ERR_INVALID_USAGE, comm);
  expect("progress on a forged comm", m2n_progress((m2n_comm_t *)0x7770), M2N_ERR_INVALID_USAGE, NULL);
  expect("progress on NULL", m2n_progress(NULL), M2N_ERR_INVALID_ARGUMENT, NULL);

  /* The expert aborts: the attention side sees it lost, not a hang. */
  expect("expert abort", m2n_comm_abort(ex.comm), M2N_SUCCESS, ex.comm);
  expect("call after abort", m2n_progress(ex.comm), M2N_ERR_ABORTED, ex.comm);
  expect("wait_recv after the peer aborted", m2n_wait_recv(comm, 10000, &r), M2N_ERR_PEER_LOST, comm);
  expect("destroy expert", m2n_comm_destroy(ex.comm), M2N_SUCCESS, NULL);
  expect("destroy attention", m2n_comm_destroy(comm), M2N_SUCCESS, NULL);
  expect("use after destroy", m2n_progress(comm), M2N_ERR_INVALID_USAGE, NULL);
  expect("destroy twice", m2n_comm_destroy(comm), M2N_ERR_INVALID_USAGE, NULL);
  if (strcmp(m2n_get_error_string(12345), "unknown m2n result code") != 0) failures++;

  printf(failures ? "bad_input: %d FAILED\n" : "bad_input: all passed%.0d\n", failures);
  return failures ? 1 : 0;
}
