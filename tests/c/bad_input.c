/*
 * Every misuse of the C API returns the documented error code with a
 * message, and the process survives: NULL pointers, wrong sizes, configs
 * of another size or version, bad roles and ranks, invalid and destroyed
 * handles, another communicator's handles, handles of the wrong kind,
 * double releases, racing senders, every call after an abort, destroy
 * with a round still held, calls in the wrong order.
 */
#include "check.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

struct racer {
  m2n_comm_t *comm;
  m2n_mem_t *mem;
  m2n_result_t result;
  uint64_t round;
};

static void *race_send(void *p) {
  struct racer *a = p;
  m2n_msg_t m = {a->mem, 0, 8};
  a->result = m2n_send(a->comm, &m, 1, 500, &a->round);
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
  /* Ranks that disagree on the channels' geometry never form a group. */
  m2n_config_t other = cfg;
  other.dispatch_depth = 4;
  struct expert_args ex = {.id = id, .cfg = &other};
  pthread_t t;
  pthread_create(&t, NULL, expert, &ex);
  expect("comm_init, ranks with other depths", m2n_comm_init(&comm, M2N_ROLE_ATTENTION, 0, 1, 1, &id, &cfg),
         M2N_ERR_BOOTSTRAP, NULL);
  pthread_join(t, NULL);
  expect("comm_init expert (thread), other depth", ex.result, M2N_ERR_BOOTSTRAP, NULL);

  expect("get_unique_id", m2n_get_unique_id(&id), M2N_SUCCESS, NULL);
  ex = (struct expert_args){.id = id, .cfg = &cfg};
  pthread_create(&t, NULL, expert, &ex);
  expect("comm_init attention", m2n_comm_init(&comm, M2N_ROLE_ATTENTION, 0, 1, 1, &id, &cfg), M2N_SUCCESS, NULL);
  pthread_join(t, NULL);
  expect("comm_init expert (thread)", ex.result, M2N_SUCCESS, NULL);

  m2n_mem_t *mem = NULL;
  void *ptr = NULL;
  uint64_t round = 0;
  int done = 0;
  m2n_round_t *r = NULL;
  size_t done_len = 0;
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

  /* Handles of the other communicator are refused, not taken for ours. */
  m2n_comm_t *ec = ex.comm;
  m2n_mem_t *emem = NULL, *amem = NULL;
  void *eptr = NULL, *aptr = NULL;
  expect("expert mem_alloc", m2n_mem_alloc(ec, 64, &emem, &eptr), M2N_SUCCESS, ec);
  m2n_msg_t foreign = {emem, 0, 8};
  expect("send from another communicator's buffer", m2n_send(comm, &foreign, 1, 0, &round), M2N_ERR_INVALID_USAGE, comm);
  expect("dereg another communicator's buffer", m2n_dereg_mem(comm, emem), M2N_ERR_INVALID_USAGE, comm);
  m2n_round_t *er = NULL;
  expect("expert wait_recv round 0", m2n_wait_recv(ec, 2000, &er), M2N_SUCCESS, ec);
  expect("round_data of another communicator's round", m2n_round_data(comm, er, 0, (const void **)&eptr, &done_len), M2N_ERR_INVALID_USAGE, comm);
  expect("release another communicator's round", m2n_round_release(comm, er), M2N_ERR_INVALID_USAGE, comm);
  expect("comm handle used as a round", m2n_round_release(ec, (m2n_round_t *)comm), M2N_ERR_INVALID_USAGE, ec);
  expect("round handle used as a comm", m2n_progress((m2n_comm_t *)er), M2N_ERR_INVALID_USAGE, NULL);
  expect("expert releases round 0", m2n_round_release(ec, er), M2N_SUCCESS, ec);
  expect("release round 0 twice", m2n_round_release(ec, er), M2N_ERR_INVALID_USAGE, ec);

  /* Two threads race for the one free slot (depth 1): one wins, the other
   * times out; neither corrupts the window. */
  expect("attention mem_alloc", m2n_mem_alloc(comm, 64, &amem, &aptr), M2N_SUCCESS, comm);
  struct racer rs[2] = {{comm, amem, 0, 0}, {comm, amem, 0, 0}};
  pthread_t rt[2];
  for (int i = 0; i < 2; i++) pthread_create(&rt[i], NULL, race_send, &rs[i]);
  for (int i = 0; i < 2; i++) pthread_join(rt[i], NULL);
  int wins = (rs[0].result == M2N_SUCCESS) + (rs[1].result == M2N_SUCCESS);
  int timeouts = (rs[0].result == M2N_ERR_TIMEOUT) + (rs[1].result == M2N_ERR_TIMEOUT);
  expect("racing sends: exactly one wins", wins == 1 && timeouts == 1 ? M2N_SUCCESS : M2N_ERR_INTERNAL, M2N_SUCCESS, comm);
  uint64_t won = rs[0].result == M2N_SUCCESS ? rs[0].round : rs[1].round;
  expect("the winner got round 1", won == 1 ? M2N_SUCCESS : M2N_ERR_INTERNAL, M2N_SUCCESS, comm);
  expect("expert receives round 1", m2n_wait_recv(ec, 2000, &er), M2N_SUCCESS, ec);
  uint64_t number = 99;
  expect("round_number", m2n_round_number(ec, er, &number), M2N_SUCCESS, ec);
  expect("it is round 1", number == 1 ? M2N_SUCCESS : M2N_ERR_INTERNAL, M2N_SUCCESS, ec);

  /* The expert answers; the attention rank keeps the round unreleased. */
  m2n_msg_t back = {emem, 0, 4};
  expect("expert send combine", m2n_send(ec, &back, 1, 1000, &round), M2N_SUCCESS, ec);
  m2n_round_t *held = NULL;
  expect("attention receives it (and holds it)", m2n_wait_recv(comm, 2000, &held), M2N_SUCCESS, comm);

  /* The expert aborts: every call but destroy is refused; the attention
   * side sees it lost, not a hang. */
  expect("expert abort", m2n_comm_abort(ec), M2N_SUCCESS, ec);
  expect("abort again (harmless)", m2n_comm_abort(ec), M2N_SUCCESS, ec);
  expect("progress after abort", m2n_progress(ec), M2N_ERR_ABORTED, ec);
  expect("mem_alloc after abort", m2n_mem_alloc(ec, 8, &mem, &ptr), M2N_ERR_ABORTED, ec);
  expect("reg_mem after abort", m2n_reg_mem(ec, &cfg, sizeof cfg, &mem), M2N_ERR_ABORTED, ec);
  expect("dereg_mem after abort", m2n_dereg_mem(ec, emem), M2N_ERR_ABORTED, ec);
  expect("send after abort", m2n_send(ec, &back, 1, 0, &round), M2N_ERR_ABORTED, ec);
  expect("test_send after abort", m2n_test_send(ec, 0, &done), M2N_ERR_ABORTED, ec);
  expect("wait_send after abort", m2n_wait_send(ec, 0, 10), M2N_ERR_ABORTED, ec);
  expect("test_recv after abort", m2n_test_recv(ec, &r), M2N_ERR_ABORTED, ec);
  expect("wait_recv after abort", m2n_wait_recv(ec, 10, &r), M2N_ERR_ABORTED, ec);
  expect("round_number after abort", m2n_round_number(ec, er, &number), M2N_ERR_ABORTED, ec);
  expect("round_data after abort", m2n_round_data(ec, er, 0, (const void **)&eptr, &done_len), M2N_ERR_ABORTED, ec);
  expect("round_release after abort", m2n_round_release(ec, er), M2N_ERR_ABORTED, ec);
  expect("wait_recv after the peer aborted", m2n_wait_recv(comm, 10000, &r), M2N_ERR_PEER_LOST, comm);
  m2n_msg_t ok2 = {amem, 0, 8};
  expect("send after the peer aborted", m2n_send(comm, &ok2, 1, 10000, &round), M2N_ERR_PEER_LOST, comm);
  expect("destroy expert", m2n_comm_destroy(ec), M2N_SUCCESS, NULL);
  expect("destroy attention holding an unreleased round", m2n_comm_destroy(comm), M2N_SUCCESS, NULL);
  expect("use after destroy", m2n_progress(comm), M2N_ERR_INVALID_USAGE, NULL);
  expect("destroy twice", m2n_comm_destroy(comm), M2N_ERR_INVALID_USAGE, NULL);
  if (strcmp(m2n_get_error_string(12345), "unknown m2n result code") != 0) failures++;

  printf(failures ? "bad_input: %d FAILED\n" : "bad_input: all passed%.0d\n", failures);
  return failures ? 1 : 0;
}
