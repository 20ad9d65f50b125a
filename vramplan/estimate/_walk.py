"""A tiny model of autograd's memory behaviour: walk a list of ops forward and backward and
track which storages are alive, the way PyTorch frees them.

Rules (torch/csrc/autograd): a forward op allocates its outputs; an input storage dies after its
last forward use unless an op saved it for backward (SavedVariable) or it is kept by the caller.
Backward visits ops in reverse; an op whose outputs received a gradient allocates gradients for
its inputs that need one (or passes the incoming gradient through, for add / clone / views),
releases the gradients of its outputs (they die as the node's apply returns), adds its results
into the next gradients, then releases its saved tensors. A second gradient for the same tensor
is added in place into the buffered one when nothing else references it and it is not a view,
else summed into a new buffer, both inputs freed (InputBuffer::accumulate;
docs/autograd.md#gradient-accumulation).
Gradients of trainable parameters are kept (AccumulateGrad steals the buffer into `.grad`).

Every size is one allocation, already rounded by the caller (quant.alloc). The walk reports the
highest live total and the bytes per component at that instant, so a caller can compose
identical decoder layers without walking each one.
"""
from __future__ import annotations

from dataclasses import field
from functools import cached_property
from typing import NamedTuple

from vramplan.core._record import record
from vramplan.estimate._symbolic import Size, alloc, rounded_bytes

ACT = "activations"
TMP = "temporaries"
GRAD = "gradients"


# Op.blas bits: the op's forward, its backward, runs a torch matmul (mm / addmm / bmm), i.e. a
# cuBLAS call on the calling thread's handle (cuda/_cublas.py)
FWD_BLAS, BWD_BLAS = 1, 2
BLAS = FWD_BLAS | BWD_BLAS


class Tensor(NamedTuple):
    name: str
    nbytes: int
    tag: str = ACT


class Op(NamedTuple):
    """One forward op. `grads`: (input name, bytes of its gradient); 0 bytes means the input's
    gradient is the incoming output gradient itself (add, clone, to() of the same dtype).
    (NamedTuples, not dataclasses: an estimate builds a few hundred of them.)"""
    name: str
    inputs: tuple
    outputs: tuple = ()
    saves: tuple = ()
    grads: tuple = ()
    work: int = 0                # bytes alive only inside the forward op, made after its outputs
    bwd_work: int = 0            # bytes alive only inside its backward
    param_grads: int = 0         # .grad bytes of trainable parameters the backward produces
    work_tag: str = TMP
    blas: int = 0                # FWD_BLAS | BWD_BLAS: its forward / backward calls a torch matmul (cuBLAS)
    # buffers the forward op makes before its outputs, in order, freed once the outputs exist
    # (bitsandbytes' dequantize + F.linear: absmax, then the dequantized weight)
    work_before: tuple = ()
    # buffers its backward makes before the input's gradient, in order: every one but the last is
    # freed once the last exists, the last once the gradient exists (bitsandbytes MatMul4Bit.backward:
    # `torch.matmul(grad_output, F.dequantize_4bit(B, ctx.state).to(grad_output.dtype).t())`, whose
    # dequantize_4bit frees its float32 absmax as it returns the weight); made only when that
    # gradient is (`if req_gradA`)
    bwd_before: tuple = ()
    # buffers its backward makes before the input's gradient, in order, all alive until that
    # gradient exists: a custom autograd Function's locals, freed as its backward returns the
    # gradient (TRL's ChunkedLogProbFunction.backward: fp32 accumulators and a tile buffer, then
    # `grad_hidden.to(hidden.dtype)`; its first matmul runs between them and the gradient), or a
    # derivative formula's temporaries (pow_backward: `self.pow(exponent - 1)`, times the exponent,
    # then the gradient)
    bwd_held: tuple = ()
    # inputs whose gradient the backward hands back as a view of a buffer it made, which the view
    # keeps (F.linear on a 3-D input: matmul's reshape of the 2-D product), so a second gradient
    # is summed into a new tensor, not into it (InputBuffer::accumulate's storage().use_count() == 1)
    view_grads: tuple = ()
    # (input name, bytes): a buffer its backward makes right before that input's gradient, freed
    # once the gradient exists (baddbmm's `maybe_multiply(grad.bmm(...), alpha)`: the product, then
    # its scaled copy)
    grad_before: tuple = ()


@record
class WalkResult:
    """Bytes per component alive at the highest instant of the forward part and of the backward
    part, and at the end of each; all include the `given` inputs while they live."""
    forward_peak: dict
    forward_end: dict
    backward_peak: dict
    end: dict
    forward_peak_op: str = ""
    backward_peak_op: str = ""

    @staticmethod
    def total(parts: dict) -> int:
        return sum(parts.values())


def as_size(nbytes) -> Size:
    """Sizes are symbolic.Size; a bare number or polynomial is one allocation."""
    return nbytes if isinstance(nbytes, Size) else alloc(nbytes)


class _Live:
    """Records the walk as a tape: sizes are symbolic (symbolic.Size), so nothing is summed here;
    replay() evaluates the tape for one batch x seq."""

    def __init__(self):
        self.tid: dict[str, int] = {}          # live storage name -> index into table
        self.size: dict[str, object] = {}
        self.table: list[tuple] = []           # (Size, tag) per allocation
        self.tape: list[tuple] = []            # (1, tid) alloc, (-1, tid) free, (0, op, extra tid) mark, (2,) phase end
        self.first_tid: dict[str, int] = {}    # name -> tid of its first allocation (estimate/_events.py)

    def add(self, key: str, nbytes, tag: str) -> None:
        if key in self.size:
            raise AssertionError(f"storage {key} allocated twice")
        nbytes = as_size(nbytes)
        self.size[key] = nbytes
        self.tid[key] = len(self.table)
        self.first_tid.setdefault(key, self.tid[key])
        self.table.append((nbytes, tag))
        self.tape.append((1, self.tid[key]))

    def drop(self, key: str) -> None:
        del self.size[key]
        self.tape.append((-1, self.tid.pop(key)))

    def reset(self) -> None:
        self.tape.append((2,))

    def mark(self, op: str, extra=0, extra_tag: str = TMP) -> None:
        extra_tid = -1
        if extra:
            extra_tid = len(self.table)
            self.table.append((as_size(extra), extra_tag))
        self.tape.append((0, op, extra_tid))


@record
class Tape:
    """One walked stretch of the step (a decoder layer or the head) as allocations and frees whose
    sizes are polynomials in batch and sequence length (estimate/_symbolic.py)."""
    table: tuple
    events: tuple
    # name -> tid of its first allocation; "grad:<name>" -> tid of the gradient of <name> still
    # alive when the walk ends (estimate/_events.py chains layers by these)
    names: dict = field(default_factory=dict, compare=False, hash=False)
    # (forward, backward): the index into `events` of the first cuBLAS call (Op.blas) of each part,
    # after its outputs are allocated and before its own temporary; -1 where none runs. A
    # thread's cuBLAS workspace is allocated there (estimate/_events.py, cuda/_cublas.py).
    blas: tuple = field(default=(-1, -1), compare=False, hash=False)
    # names `keep` held past the walk's end (a checkpointed layer's input, a plain loop's outputs)
    kept: tuple = field(default=(), compare=False, hash=False)

    @cached_property
    def _compiled(self):
        """The table as indices into its distinct rounded allocations, and tags as small ints."""
        keys: dict = {}
        entries = []
        for size, _tag in self.table:
            entries.append(tuple((keys.setdefault(key, len(keys)), count) for key, count in size.parts))
        tag_names = sorted({tag for _size, tag in self.table})
        tag_ids = [tag_names.index(tag) for _size, tag in self.table]
        # most entries are one allocation: their size is that key's, the others are summed
        single = [entry[0][0] if len(entry) == 1 and entry[0][1] == 1 else 0 for entry in entries]
        summed = [(tid, entry) for tid, entry in enumerate(entries) if not (len(entry) == 1 and entry[0][1] == 1)]
        return list(keys), single, summed, tag_names, tag_ids

    def replay(self, values: dict) -> WalkResult:
        """Evaluate every size for these variables and play the allocations and frees."""
        keys, single, summed, tag_names, tag_ids = self._compiled
        rounded = [rounded_bytes(key, values) for key in keys]
        sizes = [rounded[k] for k in single] if rounded else [0] * len(single)
        for tid, entry in summed:
            sizes[tid] = sum(rounded[k] * c for k, c in entry)
        parts = [0] * len(tag_names)
        total = 0
        best, best_total, best_op = [0] * len(tag_names), -1, ""
        forward = None
        for event in self.events:
            kind = event[0]
            if kind == 1:
                tid = event[1]
                parts[tag_ids[tid]] += sizes[tid]
                total += sizes[tid]
            elif kind == -1:
                tid = event[1]
                parts[tag_ids[tid]] -= sizes[tid]
                total -= sizes[tid]
            elif kind == 0:
                extra_tid = event[2]
                extra = sizes[extra_tid] if extra_tid >= 0 else 0
                if total + extra > best_total:
                    best_total, best_op = total + extra, event[1]
                    best = list(parts)
                    if extra:
                        best[tag_ids[extra_tid]] += extra
            else:  # end of the forward part
                forward = (best, best_op, list(parts))
                best, best_total, best_op = [0] * len(tag_names), -1, ""

        def named(counts: list) -> dict:
            return {tag_names[i]: v for i, v in enumerate(counts) if v}

        end = named(parts)
        if forward is None:
            return WalkResult(named(best), end, {}, end, best_op)
        return WalkResult(named(forward[0]), named(forward[2]), named(best), end, forward[1], best_op)


def walk(ops: list[Op], given: dict[str, int], keep: tuple[str, ...] = (), save: bool = True,
         backward: bool = False, grad_of: dict[str, int] | None = None,
         needs_grad: frozenset[str] = frozenset(), cached: tuple[str, ...] = (),
         reentrant: bool = False, grad_only: tuple[str, ...] = ()) -> Tape:
    """Run `ops` forward (and then backward if asked) and record the tape of allocations;
    `Tape.replay(values)` gives the peaks for one batch x seq.

    given: tensors alive when the walk starts (the segment's inputs), name -> bytes; they die
        like any other tensor after their last use unless saved or kept.
    keep: names that outlive the segment (a checkpointed layer's input); under non-reentrant
        checkpointing (save=False) the given ones among them go with the segment's last saved
        tensor in backward (the checkpoint frame's inputs).
    save: False runs the forward as gradient checkpointing does: nothing is saved, and backward
        recomputes the forward (saving) when it first needs a saved tensor, stopping after the
        last op that saves anything (torch.utils.checkpoint, non-reentrant, early stop).
    grad_of: gradients present when backward starts (segment outputs), name -> bytes.
    needs_grad: tensors that need a gradient besides what ops produce (segment inputs).
    cached: autocast weight casts (autocast_mode.cpp cached_cast): a forward that does not save
        (checkpointing's first pass) still leaves them alive in autocast's cache until the
        autocast region exits, at the end of the forward; the recomputation saves them.
    reentrant: with save=False, checkpointing as torch.utils.checkpoint(use_reentrant=True) does
        (CheckpointFunction, docs/autograd.md#reentrant-checkpointing): the first forward runs
        under no_grad, so outputs in `grad_only` (made only when grad mode is on and an input
        requires grad) are not made; backward first re-runs the whole forward with saving (no
        early stop, the segment's outputs recomputed and held), then runs the segment's backward
        while the recomputed outputs and the incoming gradients (held by the Python frame of
        CheckpointFunction.backward) stay alive until it returns.
    """
    live = _Live()
    for name, nbytes in given.items():
        live.add(name, nbytes, ACT)
    # the first cuBLAS call of the forward part and of the backward part (recomputation included:
    # it runs in the backward, on autograd's thread), as an index into the tape
    blas = [-1, -1]

    def note_blas(op: Op, part: int, bit: int) -> None:
        if op.blas & bit and blas[part] < 0:
            blas[part] = len(live.tape)
    last_use: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            last_use[name] = i
    saved_by: dict[str, int] = {}
    requires = set(needs_grad)
    # names whose last forward use is op i (outputs nobody reads die right after their op)
    frees = [tuple(n for n in dict.fromkeys((*op.inputs, *(t.name for t in op.outputs)))
                   if last_use.get(n, -1) <= i and n not in keep) for i, op in enumerate(ops)]

    no_grad = reentrant and not save
    backward_part = False   # the forward recomputed inside backward runs on autograd's thread
    hold: set = set()      # the reentrant recomputation's outputs, held until the segment's backward ends

    def run_forward(upto: int, saving: bool, stop_early: bool = False, grad_mode: bool = True) -> None:
        for i, op in enumerate(ops[:upto]):
            if stop_early and i == upto - 1 and set(op.saves) <= set(op.inputs):
                # checkpoint's early stop raises in the pack hook of the last saved tensor;
                # a generated autograd op packs its saved inputs before its kernel runs, so
                # an op that saves only inputs never allocates its outputs here
                # (docs/autograd.md#non-reentrant-checkpointing)
                for name in op.saves:
                    saved_by[name] = saved_by.get(name, 0) + 1
                return
            before = [f"{op.name}.work{k}" for k in range(len(op.work_before))]
            for key, nbytes in zip(before, op.work_before):
                live.add(key, nbytes, op.work_tag)
            for t in op.outputs:
                if grad_mode or t.name not in grad_only:
                    live.add(t.name, t.nbytes, t.tag)
            note_blas(op, 1 if backward_part else 0, FWD_BLAS)
            live.mark(op.name, op.work, op.work_tag)
            for key in before:
                live.drop(key)
            if op.param_grads or any(n in requires for n in op.inputs):
                requires.update(t.name for t in op.outputs)
                if saving:
                    for name in op.saves:
                        saved_by[name] = saved_by.get(name, 0) + 1
            for name in frees[i]:
                if name in live.size and name not in saved_by and name not in hold and (saving or name not in cached):
                    live.drop(name)

    run_forward(len(ops), save, grad_mode=not no_grad)
    if not backward:
        return Tape(tuple(live.table), tuple(live.tape), dict(live.first_tid), tuple(blas), tuple(keep))
    live.reset()
    backward_part = True
    for name in cached:   # the autocast region ended with the forward: its cache is cleared
        if name in live.size and name not in saved_by:
            live.drop(name)
    recompute_upto = 0 if save else 1 + max((i for i, op in enumerate(ops) if op.saves), default=-1)

    # Backward: gradients are storages with reference counts (pass-through shares one).
    grad_key: dict[str, str] = {}      # tensor name -> storage key of its gradient
    refs: dict[str, int] = {}
    view_keys: set = set()             # gradients that are views of a buffer their node made (Op.view_grads)
    counter = 0

    def new_grad(nbytes: int, tag: str = ACT) -> str:
        nonlocal counter
        counter += 1
        key = f"grad#{counter}"
        live.add(key, nbytes, tag)
        refs[key] = 0
        return key

    def attach(name: str, key: str) -> None:
        refs[key] += 1
        old = grad_key.get(name)
        if old is None:
            grad_key[name] = key
            return
        if refs[old] == 1 and old not in view_keys:
            # InputBuffer::accumulate, `old_var.add_(var)`: the buffered gradient is reused when
            # the buffer holds its last reference, storage included (can_accumulate_inplace)
            release(key)
            return
        # ... else `old_var + var`, a new tensor, the two freed once it is made
        summed = new_grad(live.size[key], live.table[live.tid[key]][1])
        live.mark("accumulate")
        release(old)
        release(key)
        refs[summed] += 1
        grad_key[name] = summed

    def release(key: str) -> None:
        refs[key] -= 1
        if refs[key] == 0:
            live.drop(key)
            del refs[key]

    for name, nbytes in (grad_of or {}).items():
        attach(name, new_grad(nbytes))
    pinned = []
    if no_grad:
        # CheckpointFunction.backward: the incoming gradients are its arguments, alive until it
        # returns; it re-runs the whole forward with grad enabled on detached inputs and keeps
        # the outputs, then torch.autograd.backward(outputs, grads) runs the segment's graph
        # (docs/autograd.md#reentrant-checkpointing)
        for name in grad_of or {}:
            refs[grad_key[name]] += 1
            pinned.append(grad_key[name])
        hold.update(grad_of or {})
        requires.clear()
        requires.update(needs_grad)
        run_forward(len(ops), saving=True)
        recompute_upto = 0
    keeping = set(keep) | hold
    # non-reentrant checkpointing keeps the segment's inputs for the recomputation in its frame
    # (torch/utils/checkpoint.py _checkpoint_without_reentrant_generator: `_NoopSaveInputs`), which
    # the recomputed saved tensors' holders reference: the inputs go as the last of those is
    # released, with the saved tensors of the segment's first saving op
    frame_inputs = [name for name in keep if name in given and not save and not reentrant]
    for op in reversed(ops):
        incoming = [grad_key[t.name] for t in op.outputs if t.name in grad_key]
        if not incoming:
            continue
        if recompute_upto and op.saves:
            requires.clear()
            requires.update(needs_grad)
            run_forward(recompute_upto, saving=True, stop_early=True)
            recompute_upto = 0
            # early stop raises inside the re-run forward: its frames unwind and every tensor
            # only Python referenced (not saved, not kept) is freed
            produced = {t.name for o in ops for t in o.outputs}
            for name in [n for n in live.size if n in produced and n not in saved_by and n not in keep]:
                live.drop(name)
        if op.param_grads:
            live.add(f"pgrad:{op.name}", op.param_grads, GRAD)
        before = [f"{op.name}.bwork{k}" for k in range(len(op.bwd_before))] if op.bwd_before and any(
            name in requires for name, _n in op.grads) else []
        for key, nbytes in zip(before, op.bwd_before):
            live.add(key, nbytes, op.work_tag)
        for key in before[:-1]:
            live.drop(key)
        held = [f"{op.name}.bheld{k}" for k in range(len(op.bwd_held))] if op.bwd_held and any(
            name in requires for name, _n in op.grads) else []
        for key, nbytes in zip(held, op.bwd_held):
            live.add(key, nbytes, op.work_tag)
        if held:
            note_blas(op, 1, BWD_BLAS)
        fresh = []
        pre = dict(op.grad_before)
        for name, nbytes in op.grads:
            if name not in requires:
                continue
            if name in pre:
                live.add(f"{op.name}.pre.{name}", pre[name], op.work_tag)
            key = new_grad(nbytes, op.outputs[0].tag if op.outputs else ACT) if nbytes else incoming[0]
            if name in pre:
                live.drop(f"{op.name}.pre.{name}")
            if nbytes and name in op.view_grads:
                view_keys.add(key)
            fresh.append((name, key))
        if fresh or op.param_grads:    # a backward that computes a gradient: its matmuls run
            note_blas(op, 1, BWD_BLAS)
        live.mark(op.name + ".backward", op.bwd_work, op.work_tag)
        if before:
            live.drop(before[-1])
        for key in held:
            live.drop(key)
        # the engine's call_function: the node's incoming gradients die when apply returns,
        # before its results are added into the next nodes' input buffers (engine.cpp
        # evaluate_function); a pass-through result is held meanwhile
        for _name, key in fresh:
            refs[key] += 1
        for t in op.outputs:
            key = grad_key.pop(t.name, None)
            if key is not None:
                release(key)
        for name, key in fresh:
            attach(name, key)
            release(key)
        for name in op.saves:
            if name in saved_by:
                saved_by[name] -= 1
                if saved_by[name] == 0:
                    del saved_by[name]
                    if name in live.size and name not in keeping:
                        live.drop(name)
                    if frame_inputs and not saved_by and not recompute_upto:
                        for kept in frame_inputs:
                            keeping.discard(kept)
                            if kept in live.size:
                                live.drop(kept)
                        frame_inputs = []
        for t in op.outputs:  # outputs nobody saved and nothing keeps are gone by now
            if t.name in live.size and t.name not in saved_by and t.name not in keeping:
                live.drop(t.name)
    # reentrant: CheckpointFunction.backward returns, freeing its arguments (the incoming
    # gradients) and the recomputed outputs
    for key in pinned:
        release(key)
    for name in hold:
        if name in live.size:
            live.drop(name)
    names = dict(live.first_tid)
    names.update((f"grad:{name}", live.tid[key]) for name, key in grad_key.items() if key in live.tid)
    return Tape(tuple(live.table), tuple(live.tape), names, tuple(blas), tuple(keep))


def accumulating(tape: Tape) -> Tape:
    """`tape` in a micro-step after the first under gradient accumulation: every trainable
    parameter's `.grad` exists already, so each new parameter gradient is added into it in place
    and freed (torch/csrc/autograd/functions/accumulate_grad.h accumulateGrad: `variable_grad +=
    new_grad` when grad mode is off, as in `loss.backward()`), where the first micro-step steals it
    into `.grad`. AccumulateGrad runs as soon as its input is ready (its sequence_nr is UINT64_MAX,
    functions/accumulate_grad.cpp: "always called ASAP during backwards"): the new gradient goes
    right after the backward op that made it. docs/autograd.md#gradient-accumulation-steps"""
    events, pending = [], []
    blas = list(tape.blas)
    backward = False
    for i, event in enumerate(tape.events):
        for part, at in enumerate(tape.blas):
            if at == i:
                blas[part] = len(events)
        events.append(event)
        kind = event[0]
        if kind == 2:
            backward = True
        elif kind == 1 and backward and tape.table[event[1]][1] == GRAD:
            pending.append(event[1])
        elif kind == 0 and pending:
            events.extend((-1, tid) for tid in pending)
            pending = []
    if pending:
        raise AssertionError("a parameter gradient after the tape's last op")
    return Tape(tape.table, tuple(events), tape.names, tuple(blas), tape.kept)
