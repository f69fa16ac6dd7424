"""Synthetic multimodal sequences whose label lives only in an interaction between modalities across time.

The task (used by the tests, the examples and ``benchmarks/bench_coupled_synthetic.py``): three modalities,
by default "text", "audio" and "vision", each a sequence of binary events on a time axis of ``seq_len`` steps
(think of a word, a change of pitch, a smile):

- ``source`` events (the first modality): i.i.d. Bernoulli(``event_rate``) per step;
- ``echo`` events (the second modality): at each step, with probability ``q`` the echo repeats the source event
  of ``lag`` steps before (present or not), otherwise it is a fresh Bernoulli(``event_rate``) draw;
- the third and further modalities: i.i.d. Bernoulli(``event_rate``) distractors.

Classification: label 1 when ``q = strength`` (the second modality follows the first), 0 when ``q = 0``
(independent). Regression: ``q ~ U(0, strength)`` and the label is ``q / strength``, in [0, 1].

Whatever q is, every modality's own sequence is i.i.d. Bernoulli(``event_rate``) in time, so no function of one
modality alone carries any information about the label: it lies only in how the second modality's events
follow the first modality's events ``lag`` steps later, which a model sees when the chains exchange state at every
step (Coupled Mamba) and only indirectly when each modality is summarized on its own and the summaries fused.

Each event e^m_t in {0, 1} is embedded in the modality's feature space as ``e^m_t * w_m + noise * n_t`` with a fixed
random unit direction w_m (from ``projection_seed``, shared by every split) and isotropic Gaussian noise n_t. With
``rates`` a modality is observed ``rate`` times per step (each step repeated, the noise fresh), so the modalities
come at different lengths, the papers' unaligned setting (``CoupledMambaFeatureExtractor`` aligns them).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

DEFAULT_SYNTHETIC_DIMS = {"text": 16, "audio": 8, "vision": 6}
TASKS = ("classification", "regression")


def _directions(modality_dims, projection_seed):
    rng = np.random.default_rng(projection_seed)
    directions = {}
    for name, dim in modality_dims.items():
        w = rng.standard_normal(dim)
        directions[name] = (w / np.linalg.norm(w)).astype(np.float32)
    return directions


def make_coupled_interaction_samples(
    num_samples: int,
    seq_len: int = 32,
    modality_dims: Optional[Dict[str, int]] = None,
    lag: int = 2,
    strength: float = 0.9,
    event_rate: float = 0.2,
    noise: float = 0.3,
    task: str = "classification",
    rates: Optional[Dict[str, int]] = None,
    missing_prob: float = 0.0,
    seed: int = 0,
    projection_seed: int = 1234,
) -> List[dict]:
    """``num_samples`` samples of the task in the module docstring.

    Args:
        num_samples: how many samples.
        seq_len: steps of the common time axis (before ``rates``).
        modality_dims: {name: feature dim}, at least two modalities; the first is the source, the second the echo.
        lag: how many steps the echo follows the source (>= 1: the interaction is across time).
        strength: the echo probability q of class 1 (classification), or the largest q (regression); in (0, 1].
        event_rate: probability of an event per step, in (0, 1).
        noise: std of the isotropic feature noise.
        task: "classification" (labels 0 / 1, balanced) or "regression" (labels q / strength in [0, 1]).
        rates: optional {name: int >= 1}: observations per step (a modality's length is seq_len * rate).
        missing_prob: probability that a distractor modality (third or later) is missing from a sample (None).
        seed: seed of the samples.
        projection_seed: seed of the embedding directions (keep it equal across train / test splits).

    Returns a list of {"input_features": {name: float32 array (seq_len * rate, dim) or None}, "label": int or
    float, "events": {name: int8 array (seq_len,)}}.
    """
    modality_dims = dict(DEFAULT_SYNTHETIC_DIMS if modality_dims is None else modality_dims)
    if len(modality_dims) < 2:
        raise ValueError(f"make_coupled_interaction_samples: need at least two modalities, got {list(modality_dims)}")
    if task not in TASKS:
        raise ValueError(f"make_coupled_interaction_samples: task must be one of {TASKS}, got {task!r}")
    if lag < 1 or lag >= seq_len:
        raise ValueError(f"make_coupled_interaction_samples: lag must be in [1, seq_len), got {lag} (seq_len {seq_len})")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"make_coupled_interaction_samples: strength must be in (0, 1], got {strength}")
    if not 0.0 < event_rate < 1.0:
        raise ValueError(f"make_coupled_interaction_samples: event_rate must be in (0, 1), got {event_rate}")
    rates = {name: 1 for name in modality_dims} if rates is None else {name: int(rates.get(name, 1)) for name in modality_dims}
    if any(rate < 1 for rate in rates.values()):
        raise ValueError(f"make_coupled_interaction_samples: rates must be >= 1, got {rates}")
    names = list(modality_dims)
    directions = _directions(modality_dims, projection_seed)
    rng = np.random.default_rng(seed)
    if task == "classification":
        labels = rng.permutation(np.arange(num_samples) % 2)
        echo_probs = np.where(labels == 1, strength, 0.0)
    else:
        echo_probs = rng.uniform(0.0, strength, size=num_samples)
        labels = echo_probs / strength
    samples = []
    for index in range(num_samples):
        source = rng.random(seq_len + lag) < event_rate  # steps -lag .. seq_len-1
        fresh = rng.random(seq_len) < event_rate
        copy = rng.random(seq_len) < echo_probs[index]
        events = {names[0]: source[lag:], names[1]: np.where(copy, source[:seq_len], fresh)}
        for name in names[2:]:
            events[name] = rng.random(seq_len) < event_rate
        features = {}
        for position, name in enumerate(names):
            if position >= 2 and missing_prob > 0 and rng.random() < missing_prob:
                features[name] = None
                continue
            signal = np.repeat(events[name].astype(np.float32), rates[name])  # (seq_len * rate,)
            values = signal[:, None] * directions[name][None, :]
            values = values + noise * rng.standard_normal(values.shape)
            features[name] = values.astype(np.float32)
        label = int(labels[index]) if task == "classification" else float(labels[index])
        samples.append({
            "input_features": features,
            "label": label,
            "events": {name: events[name].astype(np.int8) for name in names},
        })
    return samples


def echo_statistic(sample: dict, lag: int = 2) -> float:
    """The task's oracle statistic for one sample: the fraction of the first modality's events that the second
    modality repeats ``lag`` steps later (event_rate in expectation for class 0, more for class 1)."""
    events = sample["events"]
    names = list(events)
    source, echo = events[names[0]].astype(bool), events[names[1]].astype(bool)
    hits = source[:-lag] & echo[lag:]
    return float(hits.sum() / max(1, source[:-lag].sum()))


def samples_to_dataset(samples: List[dict]):
    """A ``datasets.Dataset`` with an ``input_features`` struct column ({modality: (L, dim) lists}) and ``label``."""
    from datasets import Dataset  # optional dependency, only needed here

    rows = []
    for sample in samples:
        features = {
            name: (None if value is None else np.asarray(value, dtype=np.float32).tolist())
            for name, value in sample["input_features"].items()
        }
        rows.append({"input_features": features, "label": sample["label"]})
    return Dataset.from_list(rows)
