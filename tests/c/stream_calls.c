/*
 * The stream-ordered C calls and the proxy thread, as a C user without a
 * GPU meets them: the header compiles without CUDA headers (streams are
 * void *), every stream call refuses clearly (M2N_ERR_STREAM naming what
 * is missing) or names the bad argument, and the proxy thread drives a
 * communicator, refuses a second start, stops, and does not stall
 * m2n_comm_destroy. (The GPU machine's scripts/gpu-check runs the stream
 * path for real.)
 */
#include "check.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int main(void) {
  m2n_config_t cfg;
  m2n_unique_id_t id;
  m2n_comm_t *comm = NULL;
  expect("config_init", m2n_config_init(&cfg, sizeof cfg), M2N_SUCCESS, NULL);
  cfg.transport = M2N_TRANSPORT_SHM;
  cfg.dispatch_slot_bytes = cfg.combine_slot_bytes = 64;
  cfg.peer_timeout_ms = 2000;
  expect("get_unique_id", m2n_get_unique_id(&id), M2N_SUCCESS, NULL);
  struct expert_args ex = {.id = id, .cfg = &cfg};
  pthread_t t;
  pthread_create(&t, NULL, expert, &ex);
  expect("comm_init attention", m2n_comm_init(&comm, M2N_ROLE_ATTENTION, 0, 1, 1, &id, &cfg), M2N_SUCCESS, NULL);
  pthread_join(t, NULL);
  expect("comm_init expert (thread)", ex.result, M2N_SUCCESS, NULL);
  m2n_comm_t *ec = ex.comm;

  m2n_mem_t *mem = NULL;
  void *ptr = NULL;
  uint64_t round = 0;
  m2n_round_t *r = NULL;
  expect("mem_alloc", m2n_mem_alloc(comm, 64, &mem, &ptr), M2N_SUCCESS, comm);
  m2n_msg_t m = {mem, 0, 8};

  /* Arguments are checked before any stream is touched. */
  expect("send_stream NULL round", m2n_send_stream(comm, &m, 1, NULL, NULL), M2N_ERR_INVALID_ARGUMENT, comm);
  expect("send_stream NULL msgs", m2n_send_stream(comm, NULL, 1, NULL, &round), M2N_ERR_INVALID_ARGUMENT, comm);
  expect("recv_stream NULL round", m2n_recv_stream(ec, NULL, NULL), M2N_ERR_INVALID_ARGUMENT, ec);
  expect("release_stream of a forged round", m2n_round_release_stream(ec, (m2n_round_t *)0x48, NULL),
         M2N_ERR_INVALID_USAGE, ec);
  expect("send_stream on a destroyed comm", m2n_send_stream((m2n_comm_t *)0x18, &m, 1, NULL, &round),
         M2N_ERR_INVALID_USAGE, NULL);

  /* No GPU (or no current CUDA context for the NULL stream): refused, named. */
  m2n_result_t got = m2n_send_stream(comm, &m, 1, NULL, &round);
  expect("send_stream without a CUDA stream", got, M2N_ERR_STREAM, comm);
  const char *why = m2n_comm_get_last_error(comm);
  if (strstr(why, "CUDA") == NULL && strstr(why, "GPU") == NULL && strstr(why, "context") == NULL) {
    printf("FAIL the refusal does not say what is missing: %s\n", why);
    failures++;
  }
  expect("recv_stream without a CUDA stream", m2n_recv_stream(ec, NULL, &r), M2N_ERR_STREAM, ec);
  expect("reg_mem_device NULL", m2n_reg_mem_device(comm, NULL, 64, &mem), M2N_ERR_INVALID_ARGUMENT, comm);
  m2n_mem_t *dmem = NULL;
  got = m2n_reg_mem_device(comm, (void *)0x7f0000000000, 64, &dmem);
  if (got == M2N_SUCCESS) {
    printf("FAIL reg_mem_device took a made-up device pointer\n");
    failures++;
  } else {
    printf("ok   %-48s %s: %s\n", "reg_mem_device over shm, made-up pointer", m2n_get_error_string(got),
           m2n_comm_get_last_error(comm));
  }
  if (strstr(m2n_get_error_string(M2N_ERR_STREAM), "stream") == NULL) failures++; /* "GPU or stream ..." */

  /* The proxy thread drives the expert while this thread only sends and
   * the expert's caller only tests (never progresses). */
  expect("stop_proxy before start", m2n_comm_stop_proxy(ec), M2N_ERR_INVALID_USAGE, ec);
  expect("start_proxy", m2n_comm_start_proxy(ec), M2N_SUCCESS, ec);
  expect("start_proxy twice", m2n_comm_start_proxy(ec), M2N_ERR_INVALID_USAGE, ec);
  for (int k = 0; k < 20; k++) {
    memset(ptr, k + 1, 8);
    expect("send", m2n_send(comm, &m, 1, 2000, &round), M2N_SUCCESS, comm);
    expect("wait_send", m2n_wait_send(comm, round, 2000), M2N_SUCCESS, comm);
    m2n_result_t res;
    while ((res = m2n_test_recv(ec, &r)) == M2N_AGAIN) {
    }
    expect("test_recv (proxy-driven)", res, M2N_SUCCESS, ec);
    const unsigned char *data = NULL;
    size_t len = 0;
    expect("round_data", m2n_round_data(ec, r, 0, (const void **)&data, &len), M2N_SUCCESS, ec);
    if (len != 8 || data[0] != k + 1 || data[7] != k + 1) {
      printf("FAIL round %d carries wrong bytes\n", k);
      failures++;
    }
    expect("round_release", m2n_round_release(ec, r), M2N_SUCCESS, ec);
  }
  expect("stop_proxy", m2n_comm_stop_proxy(ec), M2N_SUCCESS, ec);
  expect("stop_proxy twice", m2n_comm_stop_proxy(ec), M2N_ERR_INVALID_USAGE, ec);
  expect("start_proxy again", m2n_comm_start_proxy(ec), M2N_SUCCESS, ec);
  /* The attention rank aborts: the proxy stops on the lost peer and says so. */
  expect("attention abort", m2n_comm_abort(comm), M2N_SUCCESS, comm);
  expect("start_proxy after abort", m2n_comm_start_proxy(comm), M2N_ERR_ABORTED, comm);
  m2n_result_t stopped = M2N_SUCCESS;
  for (int i = 0; i < 500; i++) {
    /* test_recv reports the loss too; the proxy may see it first. */
    if (m2n_test_recv(ec, &r) == M2N_ERR_PEER_LOST) break;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  stopped = m2n_comm_stop_proxy(ec);
  expect("stop_proxy after the peer was lost", stopped, M2N_ERR_PEER_LOST, ec);
  expect("start_proxy on a fresh comm, then destroy", m2n_comm_start_proxy(ec), M2N_SUCCESS, ec);
  expect("destroy expert with its proxy running", m2n_comm_destroy(ec), M2N_SUCCESS, NULL);
  expect("destroy attention", m2n_comm_destroy(comm), M2N_SUCCESS, NULL);

  printf(failures ? "stream_calls: %d FAILED\n" : "stream_calls: all passed%.0d\n", failures);
  return failures ? 1 : 0;
}
