"""A seccomp filter (classic BPF, built here without libseccomp) for the code sandbox (engine/sandbox.py).

It makes two promises, whatever user runs the sandbox (RLIMIT_NPROC does not bind uid 0, so it cannot):
- no new processes: fork, vfork and clone without CLONE_THREAD fail with EAGAIN (threads still work); clone3, whose
  flags live in memory a filter cannot read, fails with ENOSYS, which makes glibc fall back to clone. A fork bomb
  or a fork + setsid escape therefore cannot start, and the sandbox is one process with one address-space limit.
- no kernel interfaces a judged program has no use for and that widen the attack surface: ptrace, mounts and
  namespaces, BPF, perf events, userfaultfd, io_uring, kernel keyrings, modules, kexec, cross-process memory
  access and open_by_handle_at fail with EPERM.
Any other architecture than x86_64 and aarch64 has no filter (`build` raises): the sandbox then refuses to run.
"""

from __future__ import annotations

import errno
import platform
import struct

# Syscall numbers (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h, which has no fork or vfork).
_X86_64 = {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "ptrace": 101, "mount": 165, "umount2": 166,
           "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248,
           "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
           "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320,
           "init_module": 175, "finit_module": 313, "delete_module": 176, "process_vm_readv": 310,
           "process_vm_writev": 311, "open_by_handle_at": 304, "fsopen": 430, "fsmount": 432, "open_tree": 428,
           "move_mount": 429, "mount_setattr": 442}
_AARCH64 = {"clone": 220, "clone3": 435, "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
            "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
            "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
            "io_uring_register": 427, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
            "finit_module": 273, "delete_module": 106, "process_vm_readv": 270, "process_vm_writev": 271,
            "open_by_handle_at": 265, "fsopen": 430, "fsmount": 432, "open_tree": 428, "move_mount": 429,
            "mount_setattr": 442}
# machine name -> (AUDIT_ARCH_* constant, syscall table)
_ARCHES = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}
_X32_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers, refused wholesale
_CLONE_THREAD = 0x00010000

# Classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
# Offsets into struct seccomp_data: nr, arch, then args[0] at 16 (its low 32 bits on little-endian machines).
_NR, _ARCH, _ARG0_LO = 0, 4, 16

NO_PROCESSES = ("fork", "vfork", "clone")
DENIED = tuple(name for name in _X86_64 if name not in NO_PROCESSES + ("clone3",))


def supported() -> str | None:
    """None when this machine has a filter, else why not."""
    machine = platform.machine()
    return None if machine in _ARCHES else f"no seccomp filter for this architecture ({machine}; have x86_64, aarch64)"


def build() -> bytes:
    """The filter for this machine, as the packed `struct sock_filter` array bwrap's --seccomp reads."""
    if why := supported():
        raise RuntimeError(why)
    audit_arch, table = _ARCHES[platform.machine()]
    deny_eperm = [table[name] for name in DENIED]
    deny_eagain = [table[name] for name in ("fork", "vfork") if name in table]
    # Layout: arch check, x32 check, one compare per refused number jumping to its return, the clone test, ALLOW,
    # then the returns. Jump offsets count instructions after the jump itself.
    prog: list[tuple[int, int, int, int]] = [(_LD_W_ABS, 0, 0, _ARCH), (_JEQ_K, 1, 0, audit_arch),
                                             (_RET_K, 0, 0, _RET_KILL), (_LD_W_ABS, 0, 0, _NR)]
    checks = ([(nr, "eperm") for nr in deny_eperm] + [(nr, "eagain") for nr in deny_eagain]
              + [(table["clone3"], "enosys"), (table["clone"], "clone")])
    x32 = platform.machine() == "x86_64"
    # After the compares come: [x32 JGE] ALLOW, RET eperm, RET eagain, RET enosys, clone: LD arg0, JSET, RET eagain.
    num_compares = len(checks) + x32
    tail = {"allow": 0, "eperm": 1, "eagain": 2, "enosys": 3, "clone": 4}
    for i, (nr, target) in enumerate(checks):
        prog.append((_JEQ_K, num_compares - i - 1 + tail[target], 0, nr))
    if x32:
        prog.append((_JGE_K, tail["eperm"], 0, _X32_BIT))
    prog += [(_RET_K, 0, 0, _RET_ALLOW), (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
             (_RET_K, 0, 0, _RET_ERRNO | errno.EAGAIN), (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
             (_LD_W_ABS, 0, 0, _ARG0_LO), (_JSET_K, 1, 0, _CLONE_THREAD),
             (_RET_K, 0, 0, _RET_ERRNO | errno.EAGAIN), (_RET_K, 0, 0, _RET_ALLOW)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)
