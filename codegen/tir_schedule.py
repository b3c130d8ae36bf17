"""Work items of a batch's gate/up and down phases over the threads: balanced shares, then stealing.

Imported only by the build subprocess (through tir_experts, tir_intdot and tir_amx_bf16). A
gate/up or down phase of a prefill path has `nr` work items per segment (expert), numbered
segment-major (item = s * nr + r); the token-block path (tir_experts.fma_body) has row tiles of
about equal cost, split in equal counts (`even_starts`) and claimed in chunks. For the prefill
paths, before the phase, the calling thread writes each task's first item (`task_starts`): task t's
share is the items whose cost starts in [t, t + 1) * total / ntask of
the cost axis, an item of segment s costing its column blocks plus `extra` (a path's fixed cost
per item, e.g. dequantizing its weights). In the phase, a task claims items one at a time from its
share's counter with an atomic fetch-and-add (`claim`: ktc_fetch_add_i32, C linked into the
kernel library by codegen/cpu_build: TIR has no CPU atomics), then claims what is left of every
other share the same way (stealing), so a thread that runs slow (the cost model off, a busy core, a
vCPU the hypervisor paused) does not keep the others waiting at the phase's end. Measured on the
H100 host's 16 vCPUs: with static shares, threads waited 18-27% of an int8 prefill's time.

iw layout at `o_sched` (cpu_experts.SCHED_SLOTS int32, the end of the iwork scratch): MAX_TASKS + 1 share
starts, then one counter per task, CTR_STRIDE int32 (a cache line) apart so that claims by
different threads do not bounce one line between cores.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ktc.codegen.cpu_experts import SCHED_CTR_STRIDE, SCHED_MAX_TASKS

MAX_TASKS = SCHED_MAX_TASKS
CTR_STRIDE = SCHED_CTR_STRIDE
O_CTR = MAX_TASKS + 1          # counters' offset from o_sched


def ntasks(nthr):
    """The tasks of a phase for `nthr` threads: 1 .. MAX_TASKS."""
    return T.max(1, T.min(nthr, MAX_TASKS))


def claim(iw, o_sched, v, chunk=1):
    """The next `chunk` items of task v's share, as the first one's number (an atomic fetch-and-add
    on its counter; at or past the share's end once it is exhausted)."""
    return T.call_extern("int32", "ktc_fetch_add_i32", T.address_of(iw[o_sched + O_CTR + v * CTR_STRIDE]), chunk)


def share_end(iw, o_sched, v):
    """One past the last item of task v's share."""
    return iw[o_sched + v + 1]


@T.macro
def even_starts(iw, total, ntask, o_sched):
    """Shares of equal item counts of `total` items (items that cost about the same), and the
    counters. Serial, ntask steps."""
    for t in range(ntask + 1):
        iw[o_sched + t] = T.Cast("int32", T.Cast("int64", t) * T.Cast("int64", total) // T.Cast("int64", ntask))
    for t in range(ntask):
        iw[o_sched + O_CTR + t * CTR_STRIDE] = iw[o_sched + t]


def make_task_starts(O_NSEG: int, extra: int):  # noqa: N803
    """The macro `task_starts(iw, o_cum, nr, ntask, o_sched)`: the shares' first items and the
    counters (serial, ntask x segments steps; iw[o_cum + s] = first column block of segment s)."""

    @T.macro
    def task_starts(iw, o_cum, nr, ntask, o_sched):
        total = T.Bind((iw[o_cum + iw[O_NSEG]] + extra * iw[O_NSEG]) * nr)
        for t in range(ntask + 1):
            iw[o_sched + t] = iw[O_NSEG] * nr
        for t in range(ntask):
            lo = T.Bind(T.Cast("int32", T.Cast("int64", t) * T.Cast("int64", total) // T.Cast("int64", ntask)))
            for si in range(iw[O_NSEG]):
                s = T.Bind(iw[O_NSEG] - 1 - si)       # last segment first: the first fit is written last
                c = T.Bind(iw[o_cum + s + 1] - iw[o_cum + s] + extra)
                r = T.Bind(T.max(0, (lo - (iw[o_cum + s] + extra * s) * nr + c - 1) // c))
                if r < nr:
                    iw[o_sched + t] = s * nr + r
        for t in range(ntask):
            iw[o_sched + O_CTR + t * CTR_STRIDE] = iw[o_sched + t]

    return task_starts
