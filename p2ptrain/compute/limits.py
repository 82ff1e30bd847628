"""What a peer accepts to run: size limits and the custom-call allow-list (DESIGN.md section 3).

Peers never run the submitter's Python, only serialized ``jax.export`` programs. Those are
StableHLO modules, so the dangerous part is what a module may ask XLA to do beyond ordinary
tensor arithmetic: ``custom_call`` targets (native code linked into jaxlib: LAPACK kernels,
host callbacks, ...) and host I/O ops (infeed/outfeed/send/recv, which block forever on a
peer that feeds nothing). ``jax.export.deserialize`` checks none of that, so ``check_program``
does, on the module text, *before* anything runs.

Which custom calls ordinary nets need on CPU (measured, jax 0.10.2): none. The forward and
backward of Dense, Conv, LayerNorm, relu/gelu/tanh, dot-product attention, softmax
cross-entropy, sort/top_k/cumsum/argmax, FFT, dropout's threefry RNG and the optax
sgd/momentum/adam updates all lower to plain StableHLO ops on CPU. The only custom calls seen
were LAPACK kernels from ``jnp.linalg`` (``lapack_sgetrf_ffi``, ``lapack_strsm_ffi``,
``lapack_sgeqrf_ffi``, ...), which dense nets do not use; they are refused by default and a
submitter who needs them must get peers to widen ``allowed_custom_calls``. The default allows
only ``shape_assertion``, which jax emits for programs exported with symbolic shapes and
which only compares integers.

Integrity is not checked here: a blob with a flipped byte still deserialises and runs. The
authenticated link (or a signature) is what guarantees the bytes came from the submitter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from jax import export as jax_export

__all__ = [
    "ProgramLimits",
    "ProgramRejected",
    "check_program",
    "custom_call_targets",
]

MIB = 1 << 20


class ProgramRejected(Exception):
    """A program (or bundle) failed the allow-list, the size limits or the expected signature.

    The message names the program and says why.
    """


@dataclass(frozen=True)
class ProgramLimits:
    """Bounds on what a peer will deserialize and run.

    max_program_bytes: size of one serialized program (checked before deserializing).
    max_args: number of flat inputs, and separately of flat outputs, of one program.
    allowed_custom_calls: ``custom_call`` targets a program may use (see module docstring).
    forbidden_ops: StableHLO ops refused outright: host I/O that would block a peer forever.
    """

    max_program_bytes: int = 64 * MIB
    max_args: int = 10_000
    allowed_custom_calls: frozenset[str] = frozenset({"shape_assertion"})
    forbidden_ops: frozenset[str] = field(
        default=frozenset({"infeed", "outfeed", "send", "recv"})
    )


# A quoted MLIR string literal (escapes included).
_STRING = r'"(?:[^"\\]|\\.)*"'
# Pretty form, as the MLIR printer writes every registered op: `stablehlo.custom_call @name(`
# (the symbol may itself be quoted when it has odd characters).
_PRETTY_CUSTOM_CALL = re.compile(r"\bstablehlo\.custom_call\s+@(" + _STRING + r"|[\w$.\-]+)")
# Generic form `"stablehlo.custom_call"(...)`: the printer never emits it for a valid module,
# so its presence means something we did not anticipate -> reject rather than parse.
_GENERIC_CUSTOM_CALL = re.compile(r'"(?:stablehlo|mhlo)\.custom_call"')
_STRING_RE = re.compile(_STRING)


def custom_call_targets(mlir_text: str) -> list[str]:
    """Every ``custom_call`` target in a module's text, in order of appearance.

    Fail-closed: raises ``ProgramRejected`` when the text mentions ``custom_call`` anywhere
    outside string literals (locations, attribute strings) that is not a pretty-form op whose
    target we extracted, or uses the generic op form.
    """
    if _GENERIC_CUSTOM_CALL.search(mlir_text):
        raise ProgramRejected("generic-form custom_call op; its target cannot be verified")
    targets = []
    for m in _PRETTY_CUSTOM_CALL.finditer(mlir_text):
        name = m.group(1)
        if name.startswith('"'):
            name = name[1:-1]
        targets.append(name)
    # Every `custom_call` token outside string literals must be one of the ops found above;
    # mentions inside strings (debug locations, backend_config) cannot execute anything.
    unquoted = _STRING_RE.sub('""', mlir_text)
    mentions = len(re.findall(r"custom_call", unquoted))
    if mentions != len(targets):
        raise ProgramRejected(
            f"module mentions custom_call {mentions} times outside strings but only "
            f"{len(targets)} recognisable custom_call ops were found"
        )
    return targets


def _forbidden_ops_used(mlir_text: str, forbidden: frozenset[str]) -> list[str]:
    unquoted = _STRING_RE.sub('""', mlir_text)
    found = []
    for op in sorted(forbidden):
        pattern = r"\b(?:stablehlo|mhlo)\." + re.escape(op) + r"\b"
        generic = r'"(?:stablehlo|mhlo)\.' + re.escape(op) + r'"'
        if re.search(pattern, unquoted) or re.search(generic, mlir_text):
            found.append(op)
    return found


def check_program(name: str, blob: bytes, limits: ProgramLimits) -> jax_export.Exported:
    """Deserialize one program and check it against ``limits``; nothing is executed.

    Checks, in order: serialized size; that it deserializes; no vjp module attached (peers
    never call ``Exported.vjp``, so an attached one is unexpected payload); no effects (host
    callbacks, I/O); argument counts; custom-call targets in the allow-list; no forbidden ops.
    Raises ``ProgramRejected`` naming ``name`` and the reason.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ProgramRejected(f"program {name!r}: expected bytes, got {type(blob).__name__}")
    size_bytes = len(blob)
    if size_bytes > limits.max_program_bytes:
        raise ProgramRejected(
            f"program {name!r}: {size_bytes} bytes exceeds max_program_bytes="
            f"{limits.max_program_bytes}"
        )
    try:
        exp = jax_export.deserialize(bytearray(blob))
    except Exception as e:  # any parse failure is a rejection, never a crash
        raise ProgramRejected(
            f"program {name!r}: does not deserialize as a jax.export program "
            f"({type(e).__name__}: {e})"
        ) from e
    if len(exp.mlir_module_serialized) > limits.max_program_bytes:
        raise ProgramRejected(f"program {name!r}: module exceeds max_program_bytes")
    if exp.has_vjp():
        raise ProgramRejected(
            f"program {name!r}: carries a serialized vjp module; stage programs must not"
        )
    if exp.ordered_effects or exp.unordered_effects:
        raise ProgramRejected(
            f"program {name!r}: has side effects "
            f"{list(exp.ordered_effects) + list(exp.unordered_effects)}"
        )
    for what, n in (("inputs", len(exp.in_avals)), ("outputs", len(exp.out_avals))):
        if n > limits.max_args:
            raise ProgramRejected(
                f"program {name!r}: {n} flat {what} exceeds max_args={limits.max_args}"
            )
    text = exp.mlir_module()
    try:
        targets = custom_call_targets(text)
    except ProgramRejected as e:
        raise ProgramRejected(f"program {name!r}: {e}") from None
    refused = sorted(set(t for t in targets if t not in limits.allowed_custom_calls))
    if refused:
        raise ProgramRejected(
            f"program {name!r}: custom_call targets not in the allow-list: {refused} "
            f"(allowed: {sorted(limits.allowed_custom_calls)})"
        )
    bad_ops = _forbidden_ops_used(text, limits.forbidden_ops)
    if bad_ops:
        raise ProgramRejected(f"program {name!r}: uses forbidden ops {bad_ops}")
    return exp
