"""Quality metrics from logits (pure numpy, no model code): perplexity, KL divergence and top-1 agreement.

Conventions: `logits` is (positions, vocab); row i is the distribution of the token at position i + 1, so the
targets of a window of tokens t are t[1:] and its logits rows are [:-1]. Work is done in float64, row-block by
row-block, so a long window of a large vocabulary does not need several float64 copies at once.

    from ondevice.bench.quality import perplexity, kl_divergence, top1_agreement
    ppl = perplexity(logits[:-1], tokens[1:])
    kl = kl_divergence(ref_logits, test_logits).mean()     # KL(reference || test), nats per token
    agree = top1_agreement(ref_logits, test_logits)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLOCK_ROWS = 64  # rows per float64 block: 64 x 152k vocab x 8 bytes = 78 MB at most


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (the max is subtracted first, so large logits do not overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_pair(ref_logits: np.ndarray, test_logits: np.ndarray) -> None:
    if ref_logits.shape != test_logits.shape or ref_logits.ndim != 2:
        raise ValueError(f"logits must be two (positions, vocab) arrays of one shape, got {ref_logits.shape} "
                         f"and {test_logits.shape}")


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of each target token under its row of logits."""
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"need (n, vocab) logits and n targets, got {logits.shape} and {targets.shape}")
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), BLOCK_ROWS):
        block = log_softmax(logits[start:start + BLOCK_ROWS])
        rows = np.arange(block.shape[0])
        out[start:start + BLOCK_ROWS] = -block[rows, targets[start:start + BLOCK_ROWS]]
    return out


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of the targets."""
    return float(np.exp(token_nll(logits, targets).mean()))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per-position KL(P_ref || P_test) in nats: what is lost predicting with the test model instead of the
    reference (llama.cpp's perplexity tool reports the same direction)."""
    _check_pair(ref_logits, test_logits)
    out = np.empty(ref_logits.shape[0], dtype=np.float64)
    for start in range(0, ref_logits.shape[0], BLOCK_ROWS):
        log_p = log_softmax(ref_logits[start:start + BLOCK_ROWS])
        log_q = log_softmax(test_logits[start:start + BLOCK_ROWS])
        out[start:start + BLOCK_ROWS] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return np.maximum(out, 0.0)  # rounding can give -1e-17 for identical rows; KL is never negative


def top1_matches(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    _check_pair(ref_logits, test_logits)
    return np.argmax(ref_logits, axis=-1) == np.argmax(test_logits, axis=-1)


def top1_agreement(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Fraction of positions where both pick the same most likely next token."""
    return float(top1_matches(ref_logits, test_logits).mean())


@dataclass
class QualityTotals:
    """Accumulates windows of (reference logits, test logits, targets) into the reported figures."""

    nll: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)

    def add(self, ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray) -> None:
        """Rows of both logits arrays predict `targets` (already shifted: row i predicts targets[i])."""
        _check_pair(ref_logits, test_logits)
        self.nll.append(token_nll(test_logits, targets))
        self.ref_nll.append(token_nll(ref_logits, targets))
        self.kl.append(kl_divergence(ref_logits, test_logits))
        self.top1.append(top1_matches(ref_logits, test_logits))

    def result(self) -> dict[str, float | int]:
        if not self.nll:
            raise ValueError("no tokens were evaluated")
        nll, ref_nll = np.concatenate(self.nll), np.concatenate(self.ref_nll)
        kl, top1 = np.concatenate(self.kl), np.concatenate(self.top1)
        return {
            "tokens": int(nll.size),
            "perplexity": float(np.exp(nll.mean())),
            "ref_perplexity": float(np.exp(ref_nll.mean())),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.quantile(kl, 0.99)),
            "kl_max": float(kl.max()),
            "top1_agreement": float(top1.mean()),
        }
