/* fdsupervisor._spawn: start one worker with clone(CLONE_VM | CLONE_VFORK).
 *
 * The native half of spawn.py. os.fork() copies the page tables of the whole
 * supervisor and runs Python in the child before execve(); here the child
 * borrows the parent's memory, as glibc's posix_spawn() does, and runs only
 * the few system calls a worker needs between fork and exec: its own process
 * group, default signals, its own cgroup, the fds at 3, 4, ..., the working
 * directory, the credentials, its stdout and stderr files (opened as the
 * worker's user, see docs/security.md) and the environment variables that hold
 * its own pid (LISTEN_PID, WATCHDOG_PID), which posix_spawn() cannot set.
 *
 * Rules for the child, taken from CPython's Modules/_posixsubprocess.c and
 * glibc's spawni.c, because it shares memory with the suspended parent:
 * - everything it needs (argv, envp, the text buffers of the pid variables,
 *   the group list, a scratch array) is built by the parent beforehand: no
 *   malloc, no Python API, no stdio, only async-signal-safe calls;
 * - the parent blocks every signal before clone(), so no handler of the
 *   supervisor ever runs in the child; the child resets the handlers to
 *   SIG_DFL before it unblocks signals for the worker;
 * - set*id() and setgroups() go through syscall(): glibc's wrappers signal
 *   the other threads of the process (setxid broadcast), and the "other
 *   threads" would be the parent's;
 * - an error is written to a struct in the parent's memory (the stage and
 *   errno), and the child leaves with _exit(). Once clone() returns, the
 *   child has either exec'd or died: no pipe is needed to learn which.
 *
 * A worker with a cgroup of its own is created in it: on x86-64, clone3()
 * with CLONE_INTO_CGROUP (Linux 5.7) and the cgroup's directory fd. A write
 * of the child's pid to cgroup.procs would be a migration, which takes the
 * kernel's cgroup_threadgroup_rwsem for writing and, after an idle spell,
 * waits for an RCU grace period there (rcu_sync_enter(), ~10 ms measured,
 * docs/performance.md): on the first connection to an on-demand unit. A
 * child made in its cgroup pays none of it, and is never outside it. Where
 * clone3() is not there or refuses (another architecture, a kernel before
 * 5.7, a seccomp filter answering ENOSYS or EPERM, a cgroup fd it does not
 * take), the child is made with clone() and joins by the write, as before.
 *
 * The fd table is not copied. clone() would copy the supervisor's whole
 * table and execve() would then close all of it but the worker's fds: at
 * 10,000 units, 10,000 sockets twice per start, which made a start there
 * cost three times one at 1,000 (docs/performance.md). Given spawn slots
 * (spawn_slots.py: fd numbers low in the table that the supervisor keeps
 * free), the child is made with CLONE_FILES, on the parent's own table,
 * copies the fds it needs into the slots, and then takes a table of its own
 * that holds only the fds below the last slot (close_range() with
 * CLOSE_RANGE_UNSHARE, Linux 5.9). Where the kernel or a seccomp filter
 * refuses that, the child gives up before it changed anything but the slots,
 * and the parent starts it again the old way, and every later one too. The
 * parent puts its placeholder back
 * into each slot once clone() returns. Until the child's table is its own,
 * the child changes nothing in the shared table but the slots.
 *
 * The GIL stays held throughout. _posixsubprocess keeps it across vfork()
 * too and only lets the child release it, in the parent's memory, right
 * before execve(): Python API in the child, for a wait of some 0.1 ms here.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: its pyconfig.h defines _GNU_SOURCE (clone, close_range) */

#ifndef __linux__
#error "fdsupervisor._spawn needs Linux (clone, close_range); spawn.py falls back to os.fork()"
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_UNSHARE
#define CLOSE_RANGE_UNSHARE (1U << 1) /* <linux/close_range.h>, Linux 5.9 */
#endif

/* SD_LISTEN_FDS_START: the same fact as fdpassing.LISTEN_FDS_START, which C
 * cannot import. The module exports it, and tests/unit/test_fdpassing.py
 * checks that the two agree. */
#define LISTEN_FDS_START 3

/* The 32-bit id variants where the plain ones take 16-bit ids (i386, arm). */
#ifdef SYS_setresuid32
#define SYSCALL_SETGROUPS SYS_setgroups32
#define SYSCALL_SETRESGID SYS_setresgid32
#define SYSCALL_SETRESUID SYS_setresuid32
#else
#define SYSCALL_SETGROUPS SYS_setgroups
#define SYSCALL_SETRESGID SYS_setresgid
#define SYSCALL_SETRESUID SYS_setresuid
#endif

/* The child's stack, in the parent's frame: the parent is suspended while the
 * child runs. The child's deepest call chain (sigaction, execve) needs a few
 * hundred bytes; glibc's posix_spawn() gives 32 KiB plus room for argv, which
 * it copies for its execvpe() fallback and we do not. */
#define CHILD_STACK_SIZE (32 * 1024)

/* clone3() with CLONE_INTO_CGROUP: x86-64 only, where the trampoline below
 * exists (glibc has clone3() internally, but exports no wrapper). */
#if defined(__x86_64__) && defined(SYS_clone3)
#define HAVE_CLONE_INTO_CGROUP 1
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL /* <linux/sched.h>, Linux 5.7 */
#endif

/* struct clone_args of <linux/sched.h> up to ``cgroup`` (CLONE_ARGS_SIZE_VER2,
 * 88 bytes), spelt out: that header and glibc's <sched.h> define the same
 * CLONE_* names, and older headers lack the struct. */
struct spawn_clone_args {
    uint64_t flags;
    uint64_t pidfd;
    uint64_t child_tid;
    uint64_t parent_tid;
    uint64_t exit_signal;
    uint64_t stack; /* the lowest address; the kernel starts the child at stack + stack_size */
    uint64_t stack_size;
    uint64_t tls;
    uint64_t set_tid;
    uint64_t set_tid_size;
    uint64_t cgroup;
};

/* long spawn_clone3(struct spawn_clone_args *args, size_t size,
 *                   int (*fn)(void *), void *arg);
 *
 * The raw clone3() system call; in the child, fn(arg) on the new stack.
 * Returns the child's pid or -errno in the parent; never returns in the
 * child. With CLONE_VM the child starts on the stack given in ``args`` with
 * the parent's registers, so nothing may come from the parent's stack frame:
 * fn and arg travel in registers that the syscall instruction keeps (it
 * clobbers rcx and r11 only), as glibc's clone3.S and musl's clone.s do it.
 * The child clears the frame pointer (the end of its call chain), calls fn
 * with a 16-byte aligned stack, and exits with its result if it ever returns
 * (child_main does not: it execs or _exit()s). */
long spawn_clone3(struct spawn_clone_args *args, size_t size, int (*fn)(void *), void *arg)
    __attribute__((visibility("hidden")));
#define SPAWN_STRING(x) #x
#define SPAWN_NUMBER(x) SPAWN_STRING(x) /* the expansion of x, as text */
__asm__(".pushsection .text\n" /* and back after: the compiler's section stays its own */
        ".globl spawn_clone3\n"
        ".hidden spawn_clone3\n"
        ".type spawn_clone3, @function\n"
        ".p2align 4\n"
        "spawn_clone3:\n"
#ifdef __CET__
        "    endbr64\n"
#endif
        "    movq %rcx, %r8\n"       /* arg: rcx does not survive the syscall */
        "    movl $" SPAWN_NUMBER(SYS_clone3) ", %eax\n"
        "    syscall\n"
        "    testq %rax, %rax\n"
        "    jz 1f\n"
        "    ret\n"                  /* the parent: pid, or -errno */
        "1:\n"
        "    xorl %ebp, %ebp\n"
        "    movq %r8, %rdi\n"
        "    call *%rdx\n"
        "    movl %eax, %edi\n"
        "    movl $" SPAWN_NUMBER(SYS_exit) ", %eax\n"
        "    syscall\n"
        "    hlt\n"
        ".size spawn_clone3, . - spawn_clone3\n"
        ".popsection\n");
#endif

/* "NAME=" followed by a pid: pid_max is at most 2^22, 20 digits fit any pid_t. */
#define PID_DIGITS 20

struct child_plan {
    /* Built by the parent, read by the child. */
    const char *executable;
    char *const *argv;
    char *const *envp;
    const int *fds;
    int fd_count;
    int *moved; /* scratch: fd_count slots */
    int stdio_fd; /* -1: none */
    int stdout_fd; /* -1: none; else placed at 1 */
    int stderr_fd; /* -1: none; else placed at 2 */
    const char *stdout_path; /* NULL: none; else opened at 1 as the worker's user */
    int stdout_flags;
    const char *stderr_path; /* NULL: none; else opened at 2 as the worker's user */
    int stderr_flags;
    int stderr_from_stdout; /* both name the same file: one open file for both */
    int cgroup_fd; /* -1: none; else the worker's cgroup (a directory fd), started in */
    int migrate; /* join the cgroup by writing cgroup.procs, even where clone3() could */
    int born_in_cgroup; /* set by the parent: clone3() made the child in its cgroup */
    const char *cwd; /* NULL: none */
    const gid_t *groups;
    size_t group_count;
    int set_groups;
    gid_t gid;
    int set_gid;
    uid_t uid;
    int set_uid;
    const int *rlimit_resources; /* setrlimit() of each, while still root */
    const struct rlimit *rlimits;
    int rlimit_count;
    int umask; /* -1: the supervisor's own */
    int no_new_privileges; /* PR_SET_NO_NEW_PRIVS last before execve() */
    char **pid_digits; /* where each pid variable's value goes */
    Py_ssize_t pid_variable_count;
    sigset_t reset_ignored; /* reset to SIG_DFL even when ignored */
    int max_fd; /* close_range() fallback: close up to here */
    const int *slots; /* spawn slots, ascending, or NULL: see the top of this file */
    int slot_count;
    int slot_anchor; /* what a slot holds at rest (the parent's placeholder) */
    int *staged; /* scratch: fd_count slots, the sources once staged */
    int slots_used; /* set by the parent: CLONE_FILES, and this many slots to stage in */
    /* Written by the child on failure, read by the parent after clone(). */
    const char *volatile failed_stage;
    volatile int failed_errno;
};

/* The failed stage of a setrlimit(): "limits.NAME", the unit's key. */
static const char *const rlimit_stages[RLIM_NLIMITS] = {
    [RLIMIT_CPU] = "limits.cpu", [RLIMIT_FSIZE] = "limits.fsize",
    [RLIMIT_DATA] = "limits.data", [RLIMIT_STACK] = "limits.stack",
    [RLIMIT_CORE] = "limits.core", [RLIMIT_RSS] = "limits.rss",
    [RLIMIT_NPROC] = "limits.nproc", [RLIMIT_NOFILE] = "limits.nofile",
    [RLIMIT_MEMLOCK] = "limits.memlock", [RLIMIT_AS] = "limits.as",
    [RLIMIT_LOCKS] = "limits.locks", [RLIMIT_SIGPENDING] = "limits.sigpending",
    [RLIMIT_MSGQUEUE] = "limits.msgqueue", [RLIMIT_NICE] = "limits.nice",
    [RLIMIT_RTPRIO] = "limits.rtprio", [RLIMIT_RTTIME] = "limits.rttime",
};

/* ------------------------------------------------------------------ the child */

static void
reset_signal_dispositions(const sigset_t *reset_ignored)
{
    struct sigaction default_action;
    memset(&default_action, 0, sizeof(default_action));
    default_action.sa_handler = SIG_DFL;
    for (int signum = 1; signum < _NSIG; signum++) {
        if (signum == SIGKILL || signum == SIGSTOP) {
            continue;
        }
        if (sigismember(reset_ignored, signum) != 1) {
            struct sigaction current;
            /* glibc answers EINVAL for the signals it uses itself. */
            if (sigaction(signum, NULL, &current) == -1) {
                continue;
            }
            void *handler = (current.sa_flags & SA_SIGINFO) ? (void *)current.sa_sigaction
                                                              : (void *)current.sa_handler;
            /* An ignored signal stays ignored across exec (nohup's SIGHUP);
             * a handler must go before signals are unblocked, or the
             * supervisor's handler would run in the shared memory. */
            if (handler == (void *)SIG_IGN || handler == (void *)SIG_DFL) {
                continue;
            }
        }
        (void)sigaction(signum, &default_action, NULL);
    }
}

static int
close_fds_from(int first, int max_fd)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned int)first, ~0U, 0U) == 0) {
        return 0;
    }
#endif
    /* Kernels before 5.9, or a seccomp filter that refuses close_range. */
    for (int fd = first; fd < max_fd; fd++) {
        (void)close(fd);
    }
    return 0;
}

static void
write_pid_variables(struct child_plan *plan)
{
    char reversed[PID_DIGITS];
    int length = 0;
    unsigned long value = (unsigned long)getpid();
    do {
        reversed[length++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0 && length < PID_DIGITS);
    for (Py_ssize_t i = 0; i < plan->pid_variable_count; i++) {
        char *out = plan->pid_digits[i];
        for (int j = length - 1; j >= 0; j--) {
            *out++ = reversed[j];
        }
        *out = '\0';
    }
}

/* ``source`` at ``target`` through a copy above ``above``: dup2() onto the
 * same number would be a no-op that keeps close-on-exec. The copy is closed
 * with every other fd from ``above`` on. */
static int
place_fd(int source, int target, int above)
{
    int copy = fcntl(source, F_DUPFD_CLOEXEC, above);
    if (copy == -1) {
        return -1;
    }
    return dup2(copy, target);
}

/* Opens a stdout/stderr file at ``target``. Called after the switch to the
 * worker's credentials, so the kernel checks the worker's own right to the
 * path and to whatever a symbolic link there points to. */
static int
open_output(const char *path, int flags, int target)
{
    int fd = open(path, flags, 0644);
    if (fd == -1 || fd == target) { /* without O_CLOEXEC: inherited as it is */
        return fd;
    }
    if (dup2(fd, target) == -1) {
        int saved_errno = errno;
        (void)close(fd);
        errno = saved_errno;
        return -1;
    }
    return close(fd);
}

/* The stage of a refused close_range(CLOSE_RANGE_UNSHARE), told apart by its
 * address: never reported, the parent starts the child again without slots. */
static const char unshare_stage[] = "fds";

/* The kernel (or a seccomp filter) refused CLOSE_RANGE_UNSHARE once: it will
 * again, so no later start tries. A fact about this process's kernel, as
 * CPython's _posixsubprocess keeps what it learnt of vfork(). */
static int table_sharing_refused;

/* The child's first step when it shares the parent's fd table: every fd it
 * needs copied into a slot (close-on-exec, as they are placed later), then a
 * table of its own holding only the fds below the last slot used. Nothing
 * else in the shared table changes, so the parent sees only its slots
 * rewritten, which it puts back. */
static int
take_fd_table(struct child_plan *plan)
{
    int *singles[] = {&plan->stdio_fd, &plan->stdout_fd, &plan->stderr_fd, &plan->cgroup_fd};
    const size_t single_count = sizeof(singles) / sizeof(singles[0]);
    int next = 0;
    for (int i = 0; i < plan->fd_count; i++) {
        if (dup3(plan->fds[i], plan->slots[next++], O_CLOEXEC) == -1) {
            return -1;
        }
    }
    for (size_t i = 0; i < single_count; i++) {
        if (*singles[i] < 0 || (singles[i] == &plan->cgroup_fd && plan->born_in_cgroup)) {
            continue;
        }
        /* A bad cgroup fd is the cgroup's step, as it is without slots. */
        plan->failed_stage = singles[i] == &plan->cgroup_fd ? "cgroup" : "fds";
        if (dup3(*singles[i], plan->slots[next++], O_CLOEXEC) == -1) {
            return -1;
        }
    }
    unsigned int above = (unsigned int)plan->slots[plan->slots_used - 1] + 1;
    plan->failed_stage = unshare_stage;
    if (syscall(SYS_close_range, above, ~0U, CLOSE_RANGE_UNSHARE) == -1) {
        return -1; /* before 5.9, or a seccomp filter: the parent starts it again */
    }
    /* The table is the child's own: from here on the plan names the slots (the
     * parent reads no field of it after clone() but the failure). Until here
     * the plan is as the parent made it, for a start again without slots. */
    next = 0;
    for (int i = 0; i < plan->fd_count; i++) {
        plan->staged[i] = plan->slots[next++];
    }
    plan->fds = plan->staged;
    for (size_t i = 0; i < single_count; i++) {
        if (*singles[i] < 0 || (singles[i] == &plan->cgroup_fd && plan->born_in_cgroup)) {
            continue;
        }
        *singles[i] = plan->slots[next++];
    }
    plan->failed_stage = "fds";
    return 0;
}

#define CHILD_STEP(stage, call)                 \
    do {                                        \
        plan->failed_stage = (stage);           \
        if ((call) == -1) {                     \
            goto failed;                        \
        }                                       \
    } while (0)

static int
child_main(void *argument)
{
    struct child_plan *plan = argument;
    int top = LISTEN_FDS_START + plan->fd_count;
    sigset_t empty;

    if (plan->slots_used > 0) {
        CHILD_STEP("fds", take_fd_table(plan));
    }

    /* A session of its own, as systemd's exec_child() does for every service:
     * its own process group too, which no other worker can join (setpgid()
     * only joins groups of the caller's session); see spawn.py. */
    CHILD_STEP("setsid", setsid());
    plan->failed_stage = "signals";
    reset_signal_dispositions(&plan->reset_ignored);
    /* Made by clone(): into the worker's own cgroup before it can fork
     * anything, and while still root: moving a process needs write access
     * to cgroup.procs. */
    if (plan->cgroup_fd >= 0 && !plan->born_in_cgroup) {
        int procs;
        CHILD_STEP("cgroup", procs = openat(plan->cgroup_fd, "cgroup.procs", O_WRONLY | O_CLOEXEC));
        CHILD_STEP("cgroup", write(procs, "0", 1));
        (void)close(procs);
    }

    /* A source may sit where a target goes (fd 3 may be the second socket):
     * first copy every source above the whole target range, then move. */
    for (int i = 0; i < plan->fd_count; i++) {
        CHILD_STEP("fds", plan->moved[i] = fcntl(plan->fds[i], F_DUPFD_CLOEXEC, top));
    }
    if (plan->stdio_fd >= 0) {
        int stdio;
        /* Through a copy, so that dup2() is never a no-op that would keep
         * close-on-exec (stdio_fd may be 0 or 1 itself). */
        CHILD_STEP("fds", stdio = fcntl(plan->stdio_fd, F_DUPFD_CLOEXEC, top));
        CHILD_STEP("fds", dup2(stdio, 0));
        CHILD_STEP("fds", dup2(stdio, 1));
    }
    if (plan->stdout_fd >= 0) {
        CHILD_STEP("fds", place_fd(plan->stdout_fd, STDOUT_FILENO, top));
    }
    if (plan->stderr_fd >= 0) {
        CHILD_STEP("fds", place_fd(plan->stderr_fd, STDERR_FILENO, top));
    }
    for (int i = 0; i < plan->fd_count; i++) {
        /* dup2() clears close-on-exec: the one place we want that. */
        CHILD_STEP("fds", dup2(plan->moved[i], LISTEN_FDS_START + i));
    }
    CHILD_STEP("fds", close_fds_from(top, plan->max_fd));

    /* The hardening of SPEC section 10, in systemd's order (exec_child()):
     * the umask before any file is created (the output files below), the
     * rlimits while still root, as raising a hard limit needs
     * CAP_SYS_RESOURCE, NO_NEW_PRIVS after the switch of credentials. */
    if (plan->umask >= 0) {
        (void)umask((mode_t)plan->umask);
    }
    for (int i = 0; i < plan->rlimit_count; i++) {
        const char *stage = rlimit_stages[plan->rlimit_resources[i]];
        CHILD_STEP(stage != NULL ? stage : "limits",
                   setrlimit(plan->rlimit_resources[i], &plan->rlimits[i]));
    }
    if (plan->cwd != NULL) {
        CHILD_STEP("chdir", chdir(plan->cwd));
    }
    if (plan->set_groups) {
        CHILD_STEP("setgroups", syscall(SYSCALL_SETGROUPS, plan->group_count, plan->groups));
    }
    if (plan->set_gid) {
        CHILD_STEP("setgid", syscall(SYSCALL_SETRESGID, plan->gid, plan->gid, plan->gid));
    }
    if (plan->set_uid) {
        CHILD_STEP("setuid", syscall(SYSCALL_SETRESUID, plan->uid, plan->uid, plan->uid));
    }
    if (plan->stdout_path != NULL) {
        CHILD_STEP("stdout", open_output(plan->stdout_path, plan->stdout_flags, STDOUT_FILENO));
    }
    if (plan->stderr_from_stdout) {
        CHILD_STEP("stderr", dup2(STDOUT_FILENO, STDERR_FILENO));
    } else if (plan->stderr_path != NULL) {
        CHILD_STEP("stderr", open_output(plan->stderr_path, plan->stderr_flags, STDERR_FILENO));
    }
    if (plan->no_new_privileges) {
        CHILD_STEP("no-new-privileges", prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    }
    write_pid_variables(plan);

    sigemptyset(&empty);
    CHILD_STEP("signals", sigprocmask(SIG_SETMASK, &empty, NULL));
    plan->failed_stage = "exec";
    execve(plan->executable, plan->argv, plan->envp);

failed:
    plan->failed_errno = errno != 0 ? errno : EIO;
    _exit(127);
}

/* ------------------------------------------------------------------ the parent */

#ifdef HAVE_CLONE_INTO_CGROUP
/* clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP): the child is created in
 * the cgroup of directory fd plan->cgroup_fd. Returns its pid, or -1 with
 * errno set (no child was made). */
static pid_t
clone_into_cgroup(struct child_plan *plan, char *stack, size_t stack_size)
{
    struct spawn_clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP;
    if (plan->slots_used > 0) {
        args.flags |= CLONE_FILES;
    }
    args.exit_signal = SIGCHLD;
    args.stack = (uint64_t)(uintptr_t)stack;
    args.stack_size = stack_size;
    args.cgroup = (uint64_t)plan->cgroup_fd;
    plan->born_in_cgroup = 1;
    long result = spawn_clone3(&args, sizeof(args), child_main, plan);
    if (result < 0) {
        plan->born_in_cgroup = 0;
        errno = (int)-result;
        return -1;
    }
    return (pid_t)result;
}
#endif

/* How many slots the child stages its fds in, or 0: no slots, or too few
 * for this worker (it copies the table then, as every child did before). */
static int
slots_needed(const struct child_plan *plan)
{
    if (plan->slots == NULL) {
        return 0;
    }
    int needed = plan->fd_count + (plan->stdio_fd >= 0) + (plan->stdout_fd >= 0) +
                 (plan->stderr_fd >= 0) + (plan->cgroup_fd >= 0);
    return needed > 0 && needed <= plan->slot_count ? needed : 0;
}

static pid_t clone_once(struct child_plan *plan, char *stack, size_t stack_size,
                        char *stack_top);

/* The child's run, from clone() to its execve() or _exit(). Returns the pid,
 * or -1 with errno set when clone() itself failed. */
static pid_t
clone_and_exec(struct child_plan *plan)
{
    /* A multiple of 16 and 16-byte aligned: both ends are aligned, as x86-64
     * and aarch64 need the top to be. */
    char stack[CHILD_STACK_SIZE] __attribute__((aligned(16)));
    /* The stack grows down on every architecture CPython supports on Linux
     * but hppa. */
    char *stack_top = (char *)(((uintptr_t)(stack + sizeof(stack))) & ~(uintptr_t)15);
    sigset_t all_signals, old_mask;
    pid_t pid = -1;
    int saved_errno;

    sigfillset(&all_signals);
    if ((errno = pthread_sigmask(SIG_BLOCK, &all_signals, &old_mask)) != 0) {
        return -1;
    }
    pid = clone_once(plan, stack, sizeof(stack), stack_top);
    if (pid != -1 && plan->slots_used > 0 && plan->failed_stage == unshare_stage &&
        plan->failed_errno != 0) {
        int status;
        while (waitpid(pid, &status, 0) == -1 && errno == EINTR) {
        }
        table_sharing_refused = 1;
        plan->failed_stage = NULL;
        plan->failed_errno = 0;
        pid = clone_once(plan, stack, sizeof(stack), stack_top);
    }
    saved_errno = errno;
    (void)pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    errno = saved_errno;
    return pid;
}

/* One clone() of the child: through the slots unless they cannot serve. */
static pid_t
clone_once(struct child_plan *plan, char *stack, size_t stack_size, char *stack_top)
{
    pid_t pid = -1;
    int saved_errno;

    plan->born_in_cgroup = 0;
    plan->slots_used = table_sharing_refused ? 0 : slots_needed(plan);
#ifdef HAVE_CLONE_INTO_CGROUP
    /* Any refusal (ENOSYS, EINVAL before 5.7, EPERM from a seccomp filter,
     * EBADF for an fd that is no cgroup, ...) falls back to clone() and the
     * write: where the cgroup itself is at fault, that names the step. */
    if (plan->cgroup_fd >= 0 && !plan->migrate) {
        pid = clone_into_cgroup(plan, stack, stack_size);
    }
#endif
    if (pid == -1) {
        int share = plan->slots_used > 0 ? CLONE_FILES : 0;
        pid = clone(child_main, stack_top, CLONE_VM | CLONE_VFORK | share | SIGCHLD, plan);
    }
    saved_errno = errno;
    /* The child has exec'd or died: its copies leave our slots. */
    for (int i = 0; i < plan->slots_used; i++) {
        (void)dup3(plan->slot_anchor, plan->slots[i], O_CLOEXEC);
    }
    errno = saved_errno;
    return pid;
}

static int
check_no_nul(const char *what, const char *text, Py_ssize_t size)
{
    if ((Py_ssize_t)strlen(text) != size) {
        PyErr_Format(PyExc_ValueError, "embedded null byte in %s", what);
        return -1;
    }
    return 0;
}

/* A NULL-terminated array of pointers into the bytes of ``sequence``, which
 * the caller keeps alive (and, holding the GIL, unchanged) until the exec. */
static char **
bytes_array(PyObject *sequence, const char *what, Py_ssize_t extra_slots, Py_ssize_t *count)
{
    Py_ssize_t size = PySequence_Fast_GET_SIZE(sequence);
    char **array = PyMem_New(char *, size + extra_slots + 1);
    if (array == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(sequence, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s must hold bytes, not %.100s", what,
                         Py_TYPE(item)->tp_name);
            PyMem_Free(array);
            return NULL;
        }
        array[i] = PyBytes_AS_STRING(item);
        if (check_no_nul(what, array[i], PyBytes_GET_SIZE(item)) < 0) {
            PyMem_Free(array);
            return NULL;
        }
    }
    array[size] = NULL;
    *count = size;
    return array;
}

static int
int_in_range(PyObject *object, const char *what, long low, long high, long *out)
{
    long value = PyLong_AsLong(object);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < low || value > high) {
        PyErr_Format(PyExc_ValueError, "%s out of range: %ld", what, value);
        return -1;
    }
    *out = value;
    return 0;
}

/* -1 means "leave it" (as os.setresuid does); anything else is an id. */
static int
optional_id(PyObject *object, const char *what, unsigned int *id, int *set)
{
    long value;
    if (int_in_range(object, what, -1, (long)UINT_MAX - 1, &value) < 0) {
        return -1;
    }
    *set = value != -1;
    *id = *set ? (unsigned int)value : 0;
    return 0;
}

/* None, or bytes without a NUL byte that the caller keeps alive. */
static int
optional_path(PyObject *object, const char *what, const char **out)
{
    *out = NULL;
    if (object == Py_None) {
        return 0;
    }
    if (!PyBytes_Check(object)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes or None", what);
        return -1;
    }
    *out = PyBytes_AS_STRING(object);
    return check_no_nul(what, *out, PyBytes_GET_SIZE(object));
}

/* The open() flags of a stdout/stderr file: written from its start, or
 * appended to (systemd's StandardOutput=file: and append:). */
static int
output_flags(PyObject *append, int *flags)
{
    int truth = PyObject_IsTrue(append);
    if (truth < 0) {
        return -1;
    }
    *flags = O_WRONLY | O_CREAT | O_NOCTTY | (truth ? O_APPEND : 0);
    return 0;
}

static PyObject *
raise_child_error(const char *stage, int error)
{
    PyObject *message = PyUnicode_FromFormat("%s: %s", stage, strerror(error));
    if (message == NULL) {
        return NULL;
    }
    PyObject *args = Py_BuildValue("(iN)", error, message);
    if (args == NULL) {
        return NULL;
    }
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL); /* FileNotFoundError, ... */
    Py_DECREF(args);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyDoc_STRVAR(spawn_doc,
"spawn(executable, argv, envp, fds, stdio_fd, cwd, uid, gid, groups,\n"
"      pid_variables, reset_signals, stdout_fd, stderr_fd, stdout_path,\n"
"      stdout_append, stderr_path, stderr_append, cgroup_fd, rlimits,\n"
"      umask, no_new_privileges, migrate, slot_anchor, slots, /) -> pid\n"
"\n"
"Start ``executable`` in a new process with clone(CLONE_VM | CLONE_VFORK) and\n"
"return its pid once it has exec'd. With a ``cgroup_fd`` (on x86-64, unless\n"
"``migrate`` is true), clone3() with CLONE_INTO_CGROUP creates the process in\n"
"that cgroup; where the kernel refuses, clone() and the write below.\n"
"\n"
"The child starts its own session (and process group), resets signal handlers (and the\n"
"signals in ``reset_signals`` even when ignored) to SIG_DFL, joins the cgroup\n"
"of directory fd ``cgroup_fd`` unless -1 or created there (\"0\" to its\n"
"cgroup.procs), places\n"
"``fds`` at 3, 4, ... (``stdio_fd``, unless -1, also at 0 and 1; ``stdout_fd``\n"
"at 1 and ``stderr_fd`` at 2 unless -1), closes every other fd above 2,\n"
"sets the umask unless -1 and each (resource, soft, hard) of ``rlimits``\n"
"(-1: RLIM_INFINITY), changes to ``cwd`` unless None, sets ``groups`` unless None, the gid and\n"
"uid unless -1, then opens\n"
"``stdout_path`` at 1 and ``stderr_path`` at 2 unless None (created 0644,\n"
"appended to when the flag is true), adds ``NAME=<its own pid>`` to ``envp``\n"
"for each name of ``pid_variables``, sets PR_SET_NO_NEW_PRIVS if\n"
"``no_new_privileges`` is true, empties its signal mask and execs.\n"
"\n"
"``slots`` (ascending fd numbers, each a copy of ``slot_anchor``, which the\n"
"caller keeps free) let the child start on the parent's fd table and take\n"
"one of its own that holds only the fds below them; empty, or fewer than the\n"
"worker needs, and the child copies the whole table. Each slot holds a copy\n"
"of ``slot_anchor`` again when spawn() returns.\n"
"\n"
"A failure in the child raises OSError(errno, 'STAGE: reason') once the\n"
"child is reaped; STAGE is one of setsid, cgroup, fds, limits.NAME, chdir, setgroups,\n"
"setgid, setuid, stdout, stderr, no-new-privileges, signals, exec.");

static PyObject *
native_spawn(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *argv_seq = NULL, *envp_seq = NULL, *fds_seq = NULL;
    PyObject *groups_seq = NULL, *pid_names_seq = NULL, *signals_seq = NULL, *rlimits_seq = NULL;
    int *rlimit_resources = NULL;
    struct rlimit *rlimits = NULL;
    char **argv = NULL, **envp = NULL, **pid_digits = NULL, *pid_text = NULL;
    int *fds = NULL, *moved = NULL, *slots = NULL, *staged = NULL;
    PyObject *slots_seq = NULL;
    gid_t *groups = NULL;
    PyObject *result = NULL;
    struct child_plan plan;
    Py_ssize_t argc = 0, envc = 0;
    long number;

    if (nargs != 24) {
        PyErr_Format(PyExc_TypeError, "spawn() takes exactly 24 arguments (%zd given)", nargs);
        return NULL;
    }
    memset(&plan, 0, sizeof(plan));
    PyObject *executable = args[0], *cwd = args[5], *groups_arg = args[8];

    if (!PyBytes_Check(executable)) {
        PyErr_SetString(PyExc_TypeError, "executable must be bytes");
        return NULL;
    }
    plan.executable = PyBytes_AS_STRING(executable);
    if (check_no_nul("executable", plan.executable, PyBytes_GET_SIZE(executable)) < 0) {
        return NULL;
    }
    if (cwd != Py_None) {
        if (!PyBytes_Check(cwd)) {
            PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
            return NULL;
        }
        plan.cwd = PyBytes_AS_STRING(cwd);
        if (check_no_nul("cwd", plan.cwd, PyBytes_GET_SIZE(cwd)) < 0) {
            return NULL;
        }
    }

    if ((argv_seq = PySequence_Fast(args[1], "argv must be a sequence")) == NULL ||
        (envp_seq = PySequence_Fast(args[2], "envp must be a sequence")) == NULL ||
        (fds_seq = PySequence_Fast(args[3], "fds must be a sequence")) == NULL ||
        (pid_names_seq = PySequence_Fast(args[9], "pid_variables must be a sequence")) == NULL ||
        (signals_seq = PySequence_Fast(args[10], "reset_signals must be a sequence")) == NULL) {
        goto done;
    }

    if ((argv = bytes_array(argv_seq, "argv", 0, &argc)) == NULL) {
        goto done;
    }
    if (argc == 0) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto done;
    }
    plan.argv = argv;

    /* The pid variables take the slots after the inherited entries; their
     * text is written by the child into buffers made here. */
    Py_ssize_t pid_count = PySequence_Fast_GET_SIZE(pid_names_seq);
    if ((envp = bytes_array(envp_seq, "envp", pid_count, &envc)) == NULL) {
        goto done;
    }
    size_t text_size = 0;
    for (Py_ssize_t i = 0; i < pid_count; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(pid_names_seq, i);
        if (!PyBytes_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "pid_variables must hold bytes");
            goto done;
        }
        const char *text = PyBytes_AS_STRING(name);
        if (check_no_nul("pid_variables", text, PyBytes_GET_SIZE(name)) < 0) {
            goto done;
        }
        if (PyBytes_GET_SIZE(name) == 0 || strchr(text, '=') != NULL) {
            PyErr_Format(PyExc_ValueError, "invalid environment variable name %R", name);
            goto done;
        }
        text_size += (size_t)PyBytes_GET_SIZE(name) + 1 + PID_DIGITS + 1;
    }
    pid_text = PyMem_Malloc(text_size ? text_size : 1);
    pid_digits = PyMem_New(char *, pid_count ? pid_count : 1);
    if (pid_text == NULL || pid_digits == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char *cursor = pid_text;
    for (Py_ssize_t i = 0; i < pid_count; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(pid_names_seq, i);
        Py_ssize_t length = PyBytes_GET_SIZE(name);
        envp[envc + i] = cursor;
        memcpy(cursor, PyBytes_AS_STRING(name), (size_t)length);
        cursor[length] = '=';
        cursor[length + 1] = '\0';
        pid_digits[i] = cursor + length + 1;
        cursor += length + 1 + PID_DIGITS + 1;
    }
    envp[envc + pid_count] = NULL;
    plan.envp = envp;
    plan.pid_digits = pid_digits;
    plan.pid_variable_count = pid_count;

    Py_ssize_t fd_count = PySequence_Fast_GET_SIZE(fds_seq);
    if (fd_count > INT_MAX - LISTEN_FDS_START) {
        PyErr_SetString(PyExc_ValueError, "too many fds");
        goto done;
    }
    fds = PyMem_New(int, fd_count ? fd_count : 1);
    moved = PyMem_New(int, fd_count ? fd_count : 1);
    if (fds == NULL || moved == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < fd_count; i++) {
        if (int_in_range(PySequence_Fast_GET_ITEM(fds_seq, i), "fd", 0, INT_MAX, &number) < 0) {
            goto done;
        }
        fds[i] = (int)number;
    }
    plan.fds = fds;
    plan.moved = moved;
    plan.fd_count = (int)fd_count;

    if (int_in_range(args[4], "stdio_fd", -1, INT_MAX, &number) < 0) {
        goto done;
    }
    plan.stdio_fd = (int)number;
    if (int_in_range(args[11], "stdout_fd", -1, INT_MAX, &number) < 0) {
        goto done;
    }
    plan.stdout_fd = (int)number;
    if (int_in_range(args[12], "stderr_fd", -1, INT_MAX, &number) < 0) {
        goto done;
    }
    plan.stderr_fd = (int)number;
    if (optional_path(args[13], "stdout_path", &plan.stdout_path) < 0 ||
        output_flags(args[14], &plan.stdout_flags) < 0 ||
        optional_path(args[15], "stderr_path", &plan.stderr_path) < 0 ||
        output_flags(args[16], &plan.stderr_flags) < 0) {
        goto done;
    }
    /* As systemd's can_inherit_stderr_from_stdout(): two opens of one file
     * would each write from their own offset, over each other's output. */
    plan.stderr_from_stdout = plan.stdout_path != NULL && plan.stderr_path != NULL &&
                              strcmp(plan.stdout_path, plan.stderr_path) == 0 &&
                              plan.stdout_flags == plan.stderr_flags;
    if (int_in_range(args[17], "cgroup_fd", -1, INT_MAX, &number) < 0) {
        goto done;
    }
    plan.cgroup_fd = (int)number;

    if ((rlimits_seq = PySequence_Fast(args[18], "rlimits must be a sequence")) == NULL) {
        goto done;
    }
    Py_ssize_t rlimit_count = PySequence_Fast_GET_SIZE(rlimits_seq);
    if (rlimit_count > RLIM_NLIMITS * 4) {
        PyErr_SetString(PyExc_ValueError, "too many rlimits");
        goto done;
    }
    rlimit_resources = PyMem_New(int, rlimit_count ? rlimit_count : 1);
    rlimits = PyMem_New(struct rlimit, rlimit_count ? rlimit_count : 1);
    if (rlimit_resources == NULL || rlimits == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < rlimit_count; i++) {
        long resource_number;
        long long soft, hard;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(rlimits_seq, i), "lLL;rlimits must hold (resource, soft, hard)",
                              &resource_number, &soft, &hard)) {
            goto done;
        }
        if (resource_number < 0 || resource_number >= RLIM_NLIMITS || soft < -1 || hard < -1) {
            PyErr_Format(PyExc_ValueError, "rlimit out of range: (%ld, %lld, %lld)",
                         resource_number, soft, hard);
            goto done;
        }
        rlimit_resources[i] = (int)resource_number;
        rlimits[i].rlim_cur = soft == -1 ? RLIM_INFINITY : (rlim_t)soft;
        rlimits[i].rlim_max = hard == -1 ? RLIM_INFINITY : (rlim_t)hard;
    }
    plan.rlimit_resources = rlimit_resources;
    plan.rlimits = rlimits;
    plan.rlimit_count = (int)rlimit_count;
    if (int_in_range(args[19], "umask", -1, 0777, &number) < 0) {
        goto done;
    }
    plan.umask = (int)number;
    if ((plan.no_new_privileges = PyObject_IsTrue(args[20])) < 0) {
        goto done;
    }
    if ((plan.migrate = PyObject_IsTrue(args[21])) < 0) {
        goto done;
    }

    if (optional_id(args[6], "uid", &plan.uid, &plan.set_uid) < 0 ||
        optional_id(args[7], "gid", &plan.gid, &plan.set_gid) < 0) {
        goto done;
    }
    if (groups_arg != Py_None) {
        if ((groups_seq = PySequence_Fast(groups_arg, "groups must be a sequence")) == NULL) {
            goto done;
        }
        Py_ssize_t group_count = PySequence_Fast_GET_SIZE(groups_seq);
        if (group_count > 65536) { /* NGROUPS_MAX of the kernel */
            PyErr_SetString(PyExc_ValueError, "too many groups");
            goto done;
        }
        groups = PyMem_New(gid_t, group_count ? group_count : 1);
        if (groups == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < group_count; i++) {
            if (int_in_range(PySequence_Fast_GET_ITEM(groups_seq, i), "group", 0,
                             (long)UINT_MAX - 1, &number) < 0) {
                goto done;
            }
            groups[i] = (gid_t)number;
        }
        plan.groups = groups;
        plan.group_count = (size_t)group_count;
        plan.set_groups = 1;
    }

    sigemptyset(&plan.reset_ignored);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(signals_seq); i++) {
        if (int_in_range(PySequence_Fast_GET_ITEM(signals_seq, i), "signal", 1, _NSIG - 1,
                         &number) < 0) {
            goto done;
        }
        sigaddset(&plan.reset_ignored, (int)number);
    }

    if (int_in_range(args[22], "slot_anchor", -1, INT_MAX, &number) < 0) {
        goto done;
    }
    plan.slot_anchor = (int)number;
    if ((slots_seq = PySequence_Fast(args[23], "slots must be a sequence")) == NULL) {
        goto done;
    }
    Py_ssize_t slot_count = PySequence_Fast_GET_SIZE(slots_seq);
    if (slot_count > 0 && plan.slot_anchor >= 0) {
        if (slot_count > 4096) {
            PyErr_SetString(PyExc_ValueError, "too many slots");
            goto done;
        }
        slots = PyMem_New(int, slot_count);
        staged = PyMem_New(int, fd_count ? fd_count : 1);
        if (slots == NULL || staged == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < slot_count; i++) {
            /* Above stdio, and ascending: the last slot used bounds the copy. */
            long low = i == 0 ? LISTEN_FDS_START : slots[i - 1] + 1;
            if (int_in_range(PySequence_Fast_GET_ITEM(slots_seq, i), "slot", low, INT_MAX,
                             &number) < 0) {
                goto done;
            }
            slots[i] = (int)number;
        }
        plan.slots = slots;
        plan.slot_count = (int)slot_count;
        plan.staged = staged;
    }

    long open_max = sysconf(_SC_OPEN_MAX);
    plan.max_fd = open_max > 0 && open_max < INT_MAX ? (int)open_max : 1024 * 1024;

    /* A uid or gid change in the child marks the memory it shares with us
     * as not dumpable (the kernel's commit_creds()): the supervisor would
     * lose core dumps and /proc ownership for good. Put the flag back. */
    int was_dumpable = (plan.set_uid || plan.set_gid) ? prctl(PR_GET_DUMPABLE) : -1;

    pid_t pid = clone_and_exec(&plan);
    if (pid == -1) {
        raise_child_error("clone", errno);
        goto done;
    }
    if (was_dumpable == 1 && prctl(PR_GET_DUMPABLE) != 1) {
        (void)prctl(PR_SET_DUMPABLE, 1);
    }
    if (plan.failed_errno != 0) {
        int status;
        pid_t reaped;
        Py_BEGIN_ALLOW_THREADS
        do {
            reaped = waitpid(pid, &status, 0);
        } while (reaped == -1 && errno == EINTR);
        Py_END_ALLOW_THREADS
        raise_child_error(plan.failed_stage, plan.failed_errno);
        goto done;
    }
    /* The child leads its own session already: CLONE_VFORK waited for its
     * exec. (No setpgid() from here: it would fail on a session leader.) */
    result = PyLong_FromLong((long)pid);

done:
    PyMem_Free(rlimits);
    PyMem_Free(rlimit_resources);
    Py_XDECREF(rlimits_seq);
    PyMem_Free(groups);
    PyMem_Free(moved);
    PyMem_Free(fds);
    PyMem_Free(staged);
    PyMem_Free(slots);
    Py_XDECREF(slots_seq);
    PyMem_Free(pid_digits);
    PyMem_Free(pid_text);
    PyMem_Free(envp);
    PyMem_Free(argv);
    Py_XDECREF(signals_seq);
    Py_XDECREF(pid_names_seq);
    Py_XDECREF(groups_seq);
    Py_XDECREF(fds_seq);
    Py_XDECREF(envp_seq);
    Py_XDECREF(argv_seq);
    return result;
}

static PyMethodDef spawn_methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))native_spawn, METH_FASTCALL, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef spawn_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fdsupervisor._spawn",
    .m_doc = "Start a worker with clone(CLONE_VM | CLONE_VFORK); see spawn.py.",
    .m_size = 0,
    .m_methods = spawn_methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    PyObject *module = PyModule_Create(&spawn_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "LISTEN_FDS_START", LISTEN_FDS_START) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
