/*
 * m2n_set_stream_mode / m2n_get_stream_mode as a C user without a GPU
 * meets them. The C ABI's stream calls take CUDA streams only (there are
 * no host streams in C), so the switch to graph-safe mode itself cannot be
 * reached here: this checks what can be. On a 1 x 1 group over shm: both
 * sides of both ranks start in M2N_STREAM_SEQUENCE; a bad side or mode is
 * M2N_ERR_INVALID_ARGUMENT naming it (before any stream is touched), a
 * NULL or destroyed handle and a NULL output are refused; a good request
 * without a CUDA stream is M2N_ERR_STREAM saying what is missing and
 * leaves the mode as it was, and the direct API still moves rounds with
 * every byte checked; after an abort the call is M2N_ERR_ABORTED. (The
 * graph-safe replay itself runs in m2n's Rust tests and on the GPU machine:
 * scripts/gpu-check.)
 */
#include "check.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

static void says(const char *what, const m2n_comm_t *comm, const char *needle) {
  const char *why = m2n_comm_get_last_error(comm);
  if (why == NULL || strstr(why, needle) == NULL) {
    printf("FAIL %-48s the message does not name \"%s\": %s\n", what, needle, why ? why : "(null)");
    failures++;
  }
}

static void mode_is(const char *what, m2n_comm_t *comm, int side, int want) {
  int mode = -7;
  expect(what, m2n_get_stream_mode(comm, side, &mode), M2N_SUCCESS, comm);
  if (mode != want) {
    printf("FAIL %-48s mode %d, want %d\n", what, mode, want);
    failures++;
  }
}

int main(void) {
  m2n_config_t cfg;
  m2n_unique_id_t id;
  m2n_comm_t *comm = NULL;
  expect("config_init", m2n_config_init(&cfg, sizeof cfg), M2N_SUCCESS, NULL);
  cfg.transport = M2N_TRANSPORT_SHM;
  cfg.dispatch_depth = cfg.combine_depth = 1;
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

  /* The default, on both sides of both ranks. */
  mode_is("attention send side starts in sequence", comm, M2N_SIDE_SEND, M2N_STREAM_SEQUENCE);
  mode_is("attention recv side starts in sequence", comm, M2N_SIDE_RECV, M2N_STREAM_SEQUENCE);
  mode_is("expert send side starts in sequence", ec, M2N_SIDE_SEND, M2N_STREAM_SEQUENCE);
  mode_is("expert recv side starts in sequence", ec, M2N_SIDE_RECV, M2N_STREAM_SEQUENCE);

  /* Bad arguments, named, before the stream is looked at. */
  expect("set_stream_mode mode 2", m2n_set_stream_mode(comm, M2N_SIDE_SEND, 2, NULL), M2N_ERR_INVALID_ARGUMENT,
         comm);
  says("set_stream_mode mode 2", comm, "stream mode 2");
  says("set_stream_mode mode 2", comm, "M2N_STREAM_GRAPH_SAFE");
  expect("set_stream_mode mode -1", m2n_set_stream_mode(ec, M2N_SIDE_RECV, -1, NULL), M2N_ERR_INVALID_ARGUMENT, ec);
  says("set_stream_mode mode -1", ec, "stream mode -1");
  expect("set_stream_mode side 5", m2n_set_stream_mode(comm, 5, M2N_STREAM_GRAPH_SAFE, NULL),
         M2N_ERR_INVALID_ARGUMENT, comm);
  says("set_stream_mode side 5", comm, "side 5");
  says("set_stream_mode side 5", comm, "M2N_SIDE_RECV");
  expect("get_stream_mode side -1", m2n_get_stream_mode(comm, -1, &(int){0}), M2N_ERR_INVALID_ARGUMENT, comm);
  says("get_stream_mode side -1", comm, "side -1");
  expect("get_stream_mode NULL mode", m2n_get_stream_mode(comm, M2N_SIDE_SEND, NULL), M2N_ERR_INVALID_ARGUMENT,
         comm);
  says("get_stream_mode NULL mode", comm, "mode is NULL");
  expect("set_stream_mode NULL comm", m2n_set_stream_mode(NULL, M2N_SIDE_SEND, M2N_STREAM_GRAPH_SAFE, NULL),
         M2N_ERR_INVALID_ARGUMENT, NULL);
  expect("set_stream_mode on a destroyed comm",
         m2n_set_stream_mode((m2n_comm_t *)0x18, M2N_SIDE_SEND, M2N_STREAM_GRAPH_SAFE, NULL), M2N_ERR_INVALID_USAGE,
         NULL);
  expect("get_stream_mode on a destroyed comm", m2n_get_stream_mode((m2n_comm_t *)0x18, M2N_SIDE_SEND, &(int){0}),
         M2N_ERR_INVALID_USAGE, NULL);

  /* Good arguments, no CUDA stream here: refused, saying so, nothing changed. */
  const int sides[2] = {M2N_SIDE_SEND, M2N_SIDE_RECV};
  const int modes[2] = {M2N_STREAM_SEQUENCE, M2N_STREAM_GRAPH_SAFE};
  m2n_comm_t *comms[2] = {comm, ec};
  for (int c = 0; c < 2; c++)
    for (int s = 0; s < 2; s++)
      for (int m = 0; m < 2; m++) {
        char what[64];
        snprintf(what, sizeof what, "set_stream_mode %s side %d mode %d, no stream", c ? "expert" : "attention",
                 sides[s], modes[m]);
        m2n_result_t got = m2n_set_stream_mode(comms[c], sides[s], modes[m], NULL);
        expect(what, got, M2N_ERR_STREAM, comms[c]);
        const char *why = m2n_comm_get_last_error(comms[c]);
        if (strstr(why, "CUDA") == NULL && strstr(why, "GPU") == NULL && strstr(why, "context") == NULL) {
          printf("FAIL the refusal does not say what is missing: %s\n", why);
          failures++;
        }
        mode_is("  ... and the mode is still sequence", comms[c], sides[s], M2N_STREAM_SEQUENCE);
      }

  /* The refused switches left the direct API working: rounds both ways. */
  m2n_mem_t *amem = NULL, *emem = NULL;
  unsigned char *aptr = NULL, *eptr = NULL;
  expect("mem_alloc attention", m2n_mem_alloc(comm, 64, &amem, (void **)&aptr), M2N_SUCCESS, comm);
  expect("mem_alloc expert", m2n_mem_alloc(ec, 64, &emem, (void **)&eptr), M2N_SUCCESS, ec);
  for (int k = 0; k < 5; k++) {
    uint64_t round = 0;
    m2n_round_t *r = NULL;
    const unsigned char *data = NULL;
    size_t len = 0;
    for (int i = 0; i < 64; i++) aptr[i] = (unsigned char)(k * 64 + i + 1);
    m2n_msg_t am = {amem, 0, 64};
    expect("send dispatch", m2n_send(comm, &am, 1, 2000, &round), M2N_SUCCESS, comm);
    expect("wait_recv dispatch", m2n_wait_recv(ec, 2000, &r), M2N_SUCCESS, ec);
    expect("round_data", m2n_round_data(ec, r, 0, (const void **)&data, &len), M2N_SUCCESS, ec);
    int bad = len != 64;
    for (int i = 0; i < 64 && !bad; i++) bad = data[i] != (unsigned char)(k * 64 + i + 1);
    for (int i = 0; i < 64 && !bad; i++) eptr[i] = (unsigned char)(255 - data[i]);
    expect("round_release", m2n_round_release(ec, r), M2N_SUCCESS, ec);
    expect("wait_send dispatch", m2n_wait_send(comm, round, 2000), M2N_SUCCESS, comm);
    m2n_msg_t em = {emem, 0, 64};
    expect("send combine", m2n_send(ec, &em, 1, 2000, &round), M2N_SUCCESS, ec);
    expect("wait_recv combine", m2n_wait_recv(comm, 2000, &r), M2N_SUCCESS, comm);
    expect("round_data", m2n_round_data(comm, r, 0, (const void **)&data, &len), M2N_SUCCESS, comm);
    bad |= len != 64;
    for (int i = 0; i < 64 && !bad; i++) bad = data[i] != (unsigned char)(255 - (k * 64 + i + 1));
    expect("round_release", m2n_round_release(comm, r), M2N_SUCCESS, comm);
    expect("wait_send combine", m2n_wait_send(ec, round, 2000), M2N_SUCCESS, ec);
    if (bad) {
      printf("FAIL round %d carries wrong bytes\n", k);
      failures++;
    }
  }

  expect("attention abort", m2n_comm_abort(comm), M2N_SUCCESS, comm);
  expect("set_stream_mode after abort", m2n_set_stream_mode(comm, M2N_SIDE_SEND, M2N_STREAM_GRAPH_SAFE, NULL),
         M2N_ERR_ABORTED, comm);
  expect("get_stream_mode after abort", m2n_get_stream_mode(comm, M2N_SIDE_SEND, &(int){0}), M2N_ERR_ABORTED, comm);
  expect("destroy expert", m2n_comm_destroy(ec), M2N_SUCCESS, NULL);
  expect("destroy attention", m2n_comm_destroy(comm), M2N_SUCCESS, NULL);

  printf(failures ? "stream_mode: %d FAILED\n" : "stream_mode: all passed%.0d\n", failures);
  return failures ? 1 : 0;
}
