"""The kernel side, seen from user space: BCC loader and attachment, the ctypes mirror of
bpf/abi.h, batch map access, BPF_PROG_TEST_RUN and the bpf() system call."""
