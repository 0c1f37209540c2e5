/*
 * A way out of a foreign call that never returns.
 *
 * A call made through m2n_fi_guarded can be broken off from another thread
 * by sending the calling thread the escape signal (m2n_fi_escape_install):
 * the signal's handler jumps back to where the call began, and
 * m2n_fi_guarded returns with *escaped set. m2n uses it for libfabric calls
 * that spin for ever on a lock a dead peer held (libfabric 1.17's shm
 * provider): what the call was doing is abandoned, with whatever locks of
 * the provider it held, so the caller must never call into those objects
 * again (m2n's fabric transport then refuses every call and leaks them).
 *
 * The jump is made here, in C, over the provider's frames and one Rust
 * frame that owns nothing (its trampoline); no Rust destructor is skipped.
 * The handler runs with SA_NODEFER, so the signal is not blocked when the
 * handler is left by the jump and sigsetjmp need not save the signal mask
 * (which would cost a system call per guarded call).
 */

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>

/* Where the guarded call running on this thread began; NULL outside one. */
static __thread sigjmp_buf *volatile escape_to;

/* The escape signal's handler before ours: a signal that finds no guarded
 * call (it came from elsewhere, or the call returned meanwhile) goes to it. */
static struct sigaction previous;

static void on_escape_signal(int signo, siginfo_t *info, void *ucontext)
{
    sigjmp_buf *to = escape_to;
    if (to != NULL) {
        escape_to = NULL;
        siglongjmp(*to, 1);
    }
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL)
            previous.sa_sigaction(signo, info, ucontext);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(signo);
    }
}

/* Installs the handler of `signo` (once per process: the caller makes sure).
 * Returns 0, or the errno of sigaction. */
int m2n_fi_escape_install(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_escape_signal;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, &previous) == 0 ? 0 : errno;
}

/* Runs call(arg) so that the escape signal can break it off: returns what
 * it returned with *escaped = 0, or 0 with *escaped = 1 if it was broken
 * off. */
long m2n_fi_guarded(long (*call)(void *), void *arg, int *escaped)
{
    sigjmp_buf here;
    *escaped = 0;
    if (sigsetjmp(here, 0) != 0) {
        *escaped = 1;
        return 0;
    }
    escape_to = &here;
    long ret = call(arg);
    escape_to = NULL;
    return ret;
}
