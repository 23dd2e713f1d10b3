"""Twin-Merging dynamic inference (docs/algorithms.md §5.8).

``TwinModel`` wraps the shared model θ* (a torch module, e.g. a transformers model loaded from
the merged checkpoint) and applies, per sample, θ(x) = θ* + Σ_t w_t(x) · v_t without ever building
a per-sample weight matrix:

- nn.Linear with factors:  y = W* x + b* + Σ_t w_t · B_t (A_t x) + Σ_t w_t · Δb_t.
  All experts' factors are concatenated (A_cat = [A_1; …; A_T], B_cat = [B_1 … B_T]) so a layer
  costs two skinny matmuls: h = x A_catᵀ, scaled per sample and per rank column by the weight
  of the expert the column belongs to, then y += h B_catᵀ.
- nn.Embedding with factors: y = E*[ids] + Σ_t w_t · B_t[ids] A_t, the same way.
- nn.LayerNorm with 1-D deltas: y = norm(x) · (γ* + Σ_t w_t Δγ_t) + (β* + Σ_t w_t Δβ_t), i.e.
  exactly the LayerNorm of the per-sample reconstructed parameters.
- Any other 1-D delta (or a factor on another module type) raises: there is no silent skip.

Weights: ``"router"`` mode w = softmax(router(features)), with features the mean-pooled last
hidden state of the plain shared model (the same module run with every delta switched off, so
no second copy of the model is kept); ``"hard"`` the top-1 one-hot of the same logits;
``"fixed"`` a vector (T,) for every sample or a matrix (batch, T) given to ``set_weights``.

The wrapped module is changed in place (its layers are swapped for twin layers holding the
originals): hand ``TwinModel`` a model of its own. One forward at a time per TwinModel (the
current weights live on the instance while the forward runs). Tied weights (an lm_head sharing
the embedding matrix) get the delta only where the factors are keyed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from twin.router import Router, last_hidden_state, mean_pool
from workers.kernels.twin import Factors

Mode = Literal["router", "hard", "fixed"]
FactorPair = tuple[torch.Tensor, torch.Tensor] | Factors


class _CurrentWeights:
    """The expert weights of the running forward, shared by one TwinModel's layers (None: θ* only)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class _TwinLayer(nn.Module):
    """Base of the twin layers: holds the original module and the per-rank-column expert index."""

    def __init__(self, base: nn.Module, current: _CurrentWeights) -> None:
        super().__init__()
        self.base = base
        self._current = current

    def _weights(self, x: torch.Tensor, batch_dims: int) -> torch.Tensor | None:
        """Current weights shaped (batch, 1, …, 1, T) to broadcast over ``x``'s leading dims; an
        activation shared by the whole batch (batch dim 1, e.g. position embeddings) broadcasts too."""
        w = self._current.value
        if w is None:
            return None
        if w.shape[0] != x.shape[0] and 1 not in (w.shape[0], x.shape[0]):  # batch-1 activations broadcast
            raise ValueError(
                f"expert weights are for {w.shape[0]} samples but a layer got a batch of {x.shape[0]}; "
                "twin layers need the batch as the first dimension of every activation"
            )
        dtype = x.dtype if x.is_floating_point() else self.base.weight.dtype  # embedding ids are integers
        return w.to(device=x.device, dtype=dtype).view(w.shape[0], *([1] * (batch_dims - 1)), w.shape[1])


class TwinLinear(_TwinLayer):
    """nn.Linear plus per-sample Σ_t w_t (B_t A_t x + Δb_t)."""

    def __init__(
        self,
        base: nn.Linear,
        current: _CurrentWeights,
        factors: list[tuple[torch.Tensor, torch.Tensor] | None],
        bias_deltas: torch.Tensor | None,
    ) -> None:
        super().__init__(base, current)
        like = base.weight
        self.register_buffer("A_cat", _cat([A for _, A in _present(factors)], 0, (0, base.in_features), like), persistent=False)
        self.register_buffer("B_cat", _cat([B for B, _ in _present(factors)], 1, (base.out_features, 0), like), persistent=False)
        self.register_buffer("rank_expert", _rank_expert(factors, like.device), persistent=False)
        self.register_buffer("bias_deltas", None if bias_deltas is None else bias_deltas.to(like), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self._weights(x, x.dim() - 1)
        if w is None:
            return y
        if self.rank_expert.numel():
            h = (x @ self.A_cat.mT) * w[..., self.rank_expert]
            y = y + h @ self.B_cat.mT
        if self.bias_deltas is not None:
            y = y + w @ self.bias_deltas
        return y


class TwinEmbedding(_TwinLayer):
    """nn.Embedding plus per-sample Σ_t w_t B_t[ids] A_t."""

    def __init__(self, base: nn.Embedding, current: _CurrentWeights, factors: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        super().__init__(base, current)
        if base.max_norm is not None:
            raise ValueError("twin deltas on an nn.Embedding with max_norm are not supported (it renormalizes rows)")
        like = base.weight
        shape = (base.num_embeddings, base.embedding_dim)
        self.register_buffer("B_cat", _cat([B for B, _ in _present(factors)], 1, (shape[0], 0), like), persistent=False)
        self.register_buffer("A_cat", _cat([A for _, A in _present(factors)], 0, (0, shape[1]), like), persistent=False)
        self.register_buffer("rank_expert", _rank_expert(factors, like.device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        w = self._weights(ids, ids.dim())
        if w is None or not self.rank_expert.numel():
            return y
        h = F.embedding(ids, self.B_cat) * w[..., self.rank_expert]
        return y + h @ self.A_cat


class TwinLayerNorm(_TwinLayer):
    """nn.LayerNorm over the last dimension with per-sample γ* + Σ_t w_t Δγ_t and β* + Σ_t w_t Δβ_t."""

    def __init__(
        self, base: nn.LayerNorm, current: _CurrentWeights, weight_deltas: torch.Tensor | None, bias_deltas: torch.Tensor | None
    ) -> None:
        super().__init__(base, current)
        if len(base.normalized_shape) != 1 or not base.elementwise_affine:
            raise ValueError(
                f"twin deltas need a LayerNorm over one dimension with affine parameters, got "
                f"normalized_shape={base.normalized_shape}, elementwise_affine={base.elementwise_affine}"
            )
        like = base.weight
        self.register_buffer("weight_deltas", None if weight_deltas is None else weight_deltas.to(like), persistent=False)
        self.register_buffer("bias_deltas", None if bias_deltas is None else bias_deltas.to(like), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weights(x, x.dim() - 1)
        if w is None:
            return self.base(x)
        gamma = self.base.weight if self.weight_deltas is None else self.base.weight + w @ self.weight_deltas
        beta = self.base.bias
        if self.bias_deltas is not None:
            beta = (0 if beta is None else beta) + w @ self.bias_deltas
        y = F.layer_norm(x, self.base.normalized_shape, None, None, self.base.eps) * gamma
        return y if beta is None else y + beta


class TwinModel(nn.Module):
    """θ* plus the experts' exclusive knowledge, mixed per sample (see the module docstring).

    ``factors_by_expert``: {expert: {weight name: (B, A) or Factors}};
    ``dense_deltas_by_expert``: {expert: {1-D tensor name: delta}}. Names are the shared model's
    parameter names. Expert order: the router's tasks when a router is given, else the order of
    ``factors_by_expert`` (then experts with dense deltas only). ``feature_fn(*args, **inputs)`` overrides the router features (batch, d);
    it gets the forward's inputs while every delta is off, so it may run ``twin.model``.
    """

    def __init__(
        self,
        model: nn.Module,
        factors_by_expert: Mapping[str, Mapping[str, FactorPair]],
        dense_deltas_by_expert: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        router: Router | None = None,
        feature_fn: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        dense_deltas_by_expert = dense_deltas_by_expert or {}
        self.experts = (
            list(router.tasks)
            if router is not None
            else list(factors_by_expert) + [e for e in dense_deltas_by_expert if e not in factors_by_expert]
        )
        unknown = (set(factors_by_expert) | set(dense_deltas_by_expert)) - set(self.experts)
        if unknown:
            raise ValueError(f"experts {sorted(unknown)} have deltas but are not among {self.experts} (the router's tasks)")
        self.model = model
        self.router = router
        self.feature_fn = feature_fn
        self.mode: Mode = "router" if router is not None else "fixed"
        self._fixed: torch.Tensor | None = None
        self._current = _CurrentWeights()
        self.wrapped = _install(model, self.experts, factors_by_expert, dense_deltas_by_expert, self._current)
        if router is not None:
            router.eval()

    def set_mode(self, mode: Mode) -> None:
        """Choose "router" (softmax of the router), "hard" (its top-1) or "fixed" (``set_weights``)."""
        if mode not in ("router", "hard", "fixed"):
            raise ValueError(f"mode must be 'router', 'hard' or 'fixed', got {mode!r}")
        if mode != "fixed" and self.router is None:
            raise ValueError(f"mode {mode!r} needs a router; pass router= or use set_weights")
        self.mode = mode

    def set_weights(self, weights: torch.Tensor | list[float]) -> None:
        """Fixed expert weights, (T,) for every sample or (batch, T) per sample; switches to "fixed"."""
        weights = torch.as_tensor(weights)
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        if weights.dim() != 2 or weights.shape[1] != len(self.experts):
            raise ValueError(f"weights must have shape (T,) or (batch, T) with T={len(self.experts)}, got {tuple(weights.shape)}")
        self._fixed = weights
        self.mode = "fixed"

    def expert_weights(self, *args, **inputs):
        """The weights the next forward uses for these inputs: (batch, T), or (1, T) when fixed."""
        if self.mode == "fixed":
            if self._fixed is None:
                raise ValueError("fixed mode without weights: call set_weights(...) first")
            return self._fixed
        self._current.value = None
        with torch.no_grad():
            if self.feature_fn is not None:
                features = self.feature_fn(*args, **inputs)
            elif args:
                raise ValueError("router features from positional inputs need feature_fn; pass keyword inputs")
            else:
                features = mean_pool(last_hidden_state(self.model, inputs), inputs.get("attention_mask"))
            self.router.eval()
            logits = self.router(features.to(next(self.router.parameters()).dtype))
        if self.mode == "hard":
            return F.one_hot(logits.argmax(dim=-1), len(self.experts)).to(logits.dtype)
        return torch.softmax(logits, dim=-1)

    def forward(self, *args, **inputs):
        weights = self.expert_weights(*args, **inputs)
        self._current.value = weights
        try:
            return self.model(*args, **inputs)
        finally:
            self._current.value = None

    def shared_forward(self, *args, **inputs):
        """The plain shared model θ* (every delta off)."""
        self._current.value = None
        return self.model(*args, **inputs)


def _install(
    model: nn.Module,
    experts: list[str],
    factors_by_expert: Mapping[str, Mapping[str, FactorPair]],
    dense_deltas_by_expert: Mapping[str, Mapping[str, torch.Tensor]],
    current: _CurrentWeights,
) -> list[str]:
    """Swap every module with deltas for its twin layer; returns the module paths swapped."""
    by_module: dict[str, dict[str, dict[str, object]]] = {}  # module -> parameter -> expert -> delta
    for expert_deltas in (factors_by_expert, dense_deltas_by_expert):
        for expert, deltas in expert_deltas.items():
            for name, delta in deltas.items():
                module_path, _, param = name.rpartition(".")
                by_module.setdefault(module_path, {}).setdefault(param, {})[expert] = delta

    for module_path, params in sorted(by_module.items()):
        if not module_path:
            raise ValueError(f"deltas on {sorted(params)} name the model itself; wrap the layer in a container module")
        try:
            module = model.get_submodule(module_path)
        except AttributeError as error:
            raise ValueError(
                f"deltas name module {module_path!r}, which the model lacks; the tensor names must be the "
                f"model's parameter names (e.g. {next(iter(dict(model.named_parameters())), '')!r})"
            ) from error
        twin = _twin_layer(module_path, module, params, experts, current)
        parent_path, _, child = module_path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, twin)
    return sorted(by_module)


def _twin_layer(
    path: str, module: nn.Module, params: dict[str, dict[str, object]], experts: list[str], current: _CurrentWeights
) -> _TwinLayer:
    def factors(param: str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        per_expert = params.get(param, {})
        pairs = [_pair(per_expert[e]) if e in per_expert else None for e in experts]
        for expert, pair in zip(experts, pairs):
            if pair is not None:
                B, A = pair
                shape = tuple(getattr(module, param).shape)
                if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != shape:
                    raise ValueError(
                        f"{path}.{param}, expert {expert!r}: factors B {tuple(B.shape)} A {tuple(A.shape)} "
                        f"do not multiply to the parameter's shape {shape}"
                    )
        return pairs

    def dense(param: str) -> torch.Tensor | None:
        per_expert = params.get(param)
        if not per_expert:
            return None
        target = getattr(module, param, None)
        rows = []
        for expert in experts:
            delta = per_expert.get(expert)
            if isinstance(delta, (tuple, Factors)) or (delta is not None and tuple(delta.shape) != tuple(target.shape)):
                raise ValueError(f"{path}.{param}, expert {expert!r}: a dense delta must have the parameter's shape {tuple(target.shape)}")
            rows.append(torch.zeros_like(target) if delta is None else delta.to(target))
        return torch.stack(rows)

    def check_params(allowed_factors: set[str], allowed_dense: set[str]) -> None:
        for param, per_expert in params.items():
            kinds = {"factors" if isinstance(d, (tuple, Factors)) else "dense" for d in per_expert.values()}
            allowed = (allowed_factors if kinds == {"factors"} else allowed_dense if kinds == {"dense"} else set())
            if param not in allowed or getattr(module, param, None) is None:
                raise ValueError(
                    f"{type(module).__name__} {path!r}: cannot apply {'/'.join(sorted(kinds))} deltas to "
                    f"{param!r}; twin inference supports factors on Linear/Embedding weights and dense "
                    "deltas on Linear biases and LayerNorm weights/biases"
                )

    if isinstance(module, nn.Linear):
        check_params({"weight"}, {"bias"})
        return TwinLinear(module, current, factors("weight"), dense("bias"))
    if isinstance(module, nn.Embedding):
        check_params({"weight"}, set())
        return TwinEmbedding(module, current, factors("weight"))
    if isinstance(module, nn.LayerNorm):
        check_params(set(), {"weight", "bias"})
        return TwinLayerNorm(module, current, dense("weight"), dense("bias"))
    raise ValueError(
        f"module {path!r} is a {type(module).__name__}; twin inference handles nn.Linear, nn.Embedding and "
        "nn.LayerNorm (a model with e.g. GPT-2 Conv1D layers needs them converted to nn.Linear first)"
    )


def _pair(delta: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(delta, Factors):
        return delta.B, delta.A
    if isinstance(delta, tuple) and len(delta) == 2:
        return delta
    raise ValueError(f"expected factors (B, A), got {type(delta).__name__}")


def _present(factors: list[tuple[torch.Tensor, torch.Tensor] | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pair for pair in factors if pair is not None]


def _cat(parts: list[torch.Tensor], dim: int, empty_shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    if not parts:
        return like.new_zeros(empty_shape)
    return torch.cat([part.to(like) for part in parts], dim=dim)


def _rank_expert(factors: list[tuple[torch.Tensor, torch.Tensor] | None], device: torch.device) -> torch.Tensor:
    """For each column of the concatenated rank dimension, the index of its expert."""
    ranks = [0 if pair is None else pair[1].shape[0] for pair in factors]
    return torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(ranks, device=device))
