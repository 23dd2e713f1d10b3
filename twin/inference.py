"""Twin-Merging dynamic inference (docs/algorithms.md §5.8).

``TwinModel`` wraps the shared model θ* (a torch module, e.g. a transformers model loaded from
the merged checkpoint) and applies, per sample, θ(x) = θ* + Σ_t w_t(x) · v_t without ever building
a per-sample weight matrix:

- nn.Linear with factors:  y = W* x + b* + Σ_t w_t · B_t (A_t x) + Σ_t w_t · Δb_t.
  All experts' factors are concatenated (A_cat = [A_1; …; A_T], B_cat = [B_1 … B_T]) so a layer
  costs two skinny matmuls: h = x A_catᵀ, scaled per sample and per rank column by the weight
  of the expert the column belongs to, then y += h B_catᵀ.
- nn.Embedding with factors: y = E*[ids] + Σ_t w_t · B_t[ids] A_t, the same way.
- transformers' Conv1D (GPT-2; weight stored (in, out)) with factors: y = x W* + b* + Σ_t w_t (x B_t) A_t.
- nn.LayerNorm with 1-D deltas: y = norm(x) · (γ* + Σ_t w_t Δγ_t) + (β* + Σ_t w_t Δβ_t), i.e.
  exactly the LayerNorm of the per-sample reconstructed parameters.
- RMSNorm (Llama, Mistral, Qwen2/3, torch's nn.RMSNorm: y = γ ⊙ n(x); Gemma: y = (1 + γ) ⊙ n(x))
  with a 1-D delta: the norm recomputed with the per-sample γ* + Σ_t w_t Δγ_t, in the module's own
  order of casts. Which form a module has is checked on a probe input when the model is wrapped;
  a norm that matches neither is refused by name.
- A tied output head (an nn.Linear whose weight *is* a factored embedding's) gets the embedding's
  factors too: stored once, applied at both ends, as the expert's own tied model does.
- Any other delta raises, naming the parameter: there is no silent skip.

Weights: ``"router"`` mode w = softmax(router(features)), with features the mean-pooled last
hidden state of the plain shared model over the non-padding tokens (the same module run with every
delta switched off, so no second copy of the model is kept; position ids follow the attention
mask, so a left-padded prompt routes as it does alone); ``"hard"`` the top-1 one-hot of the same
logits; ``"top_k"`` the softmax renormalised over its k largest entries; ``"fixed"`` a vector (T,)
for every sample or a matrix (batch, T) given to ``set_weights``. Experts whose weight is zero for
the whole batch cost nothing (their factor columns are skipped).

``generate`` routes once per prompt and holds the weights for every decoding step (transformers'
``generate`` and its KV cache underneath; beams and returned sequences repeat their prompt's
weights). ``forward`` routes on the inputs it is given, so a hand-written decoding loop that calls
it step by step with a cache would route on single tokens: use ``generate``.

The wrapped module is changed in place (its layers are swapped for twin layers holding the
originals): hand ``TwinModel`` a model of its own. One forward at a time per TwinModel (the
current weights live on the instance while the forward runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from twin.router import Router, last_hidden_state, mean_pool
from workers.kernels.twin import Factors

Mode = Literal["router", "hard", "fixed", "top_k"]
MODES = ("router", "hard", "fixed", "top_k")
DEFAULT_TOP_K = 2
FactorPair = tuple[torch.Tensor, torch.Tensor] | Factors


class _CurrentWeights:
    """The expert weights of the running forward, shared by one TwinModel's layers (None: θ* only).

    ``active``: the experts with a nonzero weight for some sample (the others' columns are
    skipped); ``expand``: a layer may see the batch repeated (generate's beams and returned
    sequences, ``repeat_interleave`` order); ``version`` changes with every assignment, so layers
    can keep per-call values (their sliced factors) until the weights change.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.active: tuple[int, ...] = ()
        self.expand = False
        self.version = 0

    def set(self, value: torch.Tensor | None, *, expand: bool = False) -> None:
        self.value, self.expand = value, expand
        self.active = () if value is None else tuple(int(i) for i in torch.nonzero(value.ne(0).any(0)).flatten())
        self.version += 1


class _TwinLayer(nn.Module):
    """Base of the twin layers: holds the original module and the per-rank-column expert index."""

    def __init__(self, base: nn.Module, current: _CurrentWeights) -> None:
        super().__init__()
        self.base = base
        self._current = current
        self._shaped: tuple[tuple, torch.Tensor] | None = None  # (key, weights) kept for the decoding steps
        self._derived: dict[str, torch.Tensor] = {}  # values computed from the shaped weights, kept with them

    def _weights(self, x: torch.Tensor, batch_dims: int) -> torch.Tensor | None:
        """Current weights shaped (batch, 1, …, 1, T) to broadcast over ``x``'s leading dims; an
        activation shared by the whole batch (batch dim 1, e.g. position embeddings) broadcasts too.
        The same tensor is returned until the weights or the activation's layout change."""
        w = self._current.value
        if w is None:
            return None
        key = (self._current.version, x.shape[0], batch_dims, x.dtype, x.device)
        if self._shaped is None or self._shaped[0] != key:
            self._shaped, self._derived = (key, self._shape_weights(w, x, batch_dims)), {}
        return self._shaped[1]

    def _derived_from(self, name: str, compute: Callable[[], object]):
        """``compute()``, a function of the current shaped weights, computed once per weights: every
        decoding step of a generate call reuses it."""
        if name not in self._derived:
            self._derived[name] = compute()
        return self._derived[name]

    def _shape_weights(self, w: torch.Tensor, x: torch.Tensor, batch_dims: int) -> torch.Tensor:
        if self._current.expand and x.shape[0] != w.shape[0] and x.shape[0] % w.shape[0] == 0:
            w = w.repeat_interleave(x.shape[0] // w.shape[0], dim=0)  # generate's beams / returned sequences
        if w.shape[0] != x.shape[0] and 1 not in (w.shape[0], x.shape[0]):  # batch-1 activations broadcast
            raise ValueError(
                f"expert weights are for {w.shape[0]} samples but a layer got a batch of {x.shape[0]}; "
                "twin layers need the batch as the first dimension of every activation"
            )
        dtype = x.dtype if x.is_floating_point() else self.base.weight.dtype  # embedding ids are integers
        return w.to(device=x.device, dtype=dtype).view(w.shape[0], *([1] * (batch_dims - 1)), w.shape[1])


class _FactoredLayer(_TwinLayer):
    """A twin layer with low-rank factors: every expert's concatenated along the rank dimension,
    ``A_cat`` (R, ·) and ``B_cat`` (·, R), and ``rank_expert`` (R,) the expert of each column."""

    def _set_factors(self, A_cat: torch.Tensor, B_cat: torch.Tensor, ranks: list[int]) -> None:
        self.register_buffer("A_cat", A_cat, persistent=False)
        self.register_buffer("B_cat", B_cat, persistent=False)
        self.register_buffer("rank_expert", torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
                             .to(A_cat.device), persistent=False)
        self._sliced: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, rank_expert) of the experts active in the current weights (kept until they change)."""
        current = self._current
        if self._sliced is None or self._sliced[0] != current.version:
            present = set(self.rank_expert.unique().tolist())
            if present <= set(current.active):
                sliced = (self.A_cat, self.B_cat, self.rank_expert)
            else:
                columns = torch.isin(self.rank_expert, torch.tensor(current.active, dtype=torch.long,
                                                                    device=self.rank_expert.device))
                sliced = (self.A_cat[columns], self.B_cat[:, columns], self.rank_expert[columns])
            self._sliced = (current.version, sliced)
        return self._sliced[1]


class TwinLinear(_FactoredLayer):
    """nn.Linear plus per-sample Σ_t w_t (B_t A_t x + Δb_t). With ``stored_transposed``: transformers'
    Conv1D (GPT-2), whose weight is stored (in, out), y = x W + b; its factors multiply to that stored
    shape, so y gains Σ_t w_t (x B_t) A_t, the same two products with Bᵀ and Aᵀ in A's and B's places."""

    def __init__(
        self,
        base: nn.Module,
        current: _CurrentWeights,
        factors: list[tuple[torch.Tensor, torch.Tensor] | None],
        bias_deltas: torch.Tensor | None,
        *,
        stored_transposed: bool = False,
    ) -> None:
        super().__init__(base, current)
        like = base.weight
        if stored_transposed:  # W (in, out) ≈ B A: x ↦ (x B) A, i.e. "A" = Bᵀ (R, in), "B" = Aᵀ (out, R)
            (fan_in, fan_out), down, up = like.shape, [B.mT for B, _ in _present(factors)], [A.mT for _, A in _present(factors)]
        else:
            (fan_out, fan_in), down, up = like.shape, [A for _, A in _present(factors)], [B for B, _ in _present(factors)]
        self._set_factors(_cat(down, 0, (0, fan_in), like), _cat(up, 1, (fan_out, 0), like), _ranks(factors))
        self.register_buffer("bias_deltas", None if bias_deltas is None else bias_deltas.to(like), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self._weights(x, x.dim() - 1)
        if w is None:
            return y
        A, B, rank_expert = self._factors()
        if rank_expert.numel():
            y = y + ((x @ A.mT) * self._derived_from("columns", lambda: w[..., rank_expert])) @ B.mT
        if self.bias_deltas is not None:
            y = y + self._derived_from("bias", lambda: w @ self.bias_deltas)
        return y


class TwinEmbedding(_FactoredLayer):
    """nn.Embedding plus per-sample Σ_t w_t B_t[ids] A_t."""

    def __init__(self, base: nn.Embedding, current: _CurrentWeights, factors: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        super().__init__(base, current)
        if base.max_norm is not None:
            raise ValueError("twin deltas on an nn.Embedding with max_norm are not supported (it renormalizes rows)")
        like = base.weight
        self._set_factors(_cat([A for _, A in _present(factors)], 0, (0, base.embedding_dim), like),
                          _cat([B for B, _ in _present(factors)], 1, (base.num_embeddings, 0), like), _ranks(factors))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        w = self._weights(ids, ids.dim())
        if w is None:
            return y
        A, B, rank_expert = self._factors()
        if not rank_expert.numel():
            return y
        return y + (F.embedding(ids, B) * self._derived_from("columns", lambda: w[..., rank_expert])) @ A


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
        gamma, beta = self._derived_from("affine", lambda: self._affine(w))
        y = F.layer_norm(x, self.base.normalized_shape, None, None, self.base.eps) * gamma
        return y if beta is None else y + beta

    def _affine(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-sample (γ, β)."""
        gamma = self.base.weight if self.weight_deltas is None else self.base.weight + w @ self.weight_deltas
        beta = self.base.bias
        if self.bias_deltas is not None:
            beta = (0 if beta is None else beta) + w @ self.bias_deltas
        return gamma, beta


RMS_FORMS = ("scale", "offset")  # y = γ ⊙ n(x) (Llama, Mistral, Qwen, nn.RMSNorm); y = (1 + γ) ⊙ n(x) (Gemma)


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float, form: str) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension with (possibly per-sample) ``gamma``, in the casts
    transformers' norms use: statistics in float32; "scale" casts n(x) back before γ ⊙ (Llama's
    order), "offset" multiplies by (1 + γ) in float32 and casts last (Gemma's)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if form == "scale":
        return gamma * h.to(x.dtype)
    return (h * (1.0 + gamma.float())).type_as(x)


def rms_norm_form(module: nn.Module) -> tuple[str, float] | None:
    """(form, eps) when ``module`` computes one of ``RMS_FORMS`` with its 1-D ``weight`` (checked on
    a probe input), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or isinstance(module, (nn.LayerNorm, nn.Linear)):
        return None
    if getattr(module, "bias", None) is not None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None and isinstance(module, nn.RMSNorm):
        eps = torch.finfo(weight.dtype).eps
    if not isinstance(eps, float):
        return None
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        expected = module(probe)
        tolerance = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 1e-2
        for form in RMS_FORMS:
            got = rms_norm(probe, weight, eps, form)
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=tolerance, atol=tolerance):
                return form, eps
    return None


class TwinRMSNorm(_TwinLayer):
    """An RMSNorm (``rms_norm_form``) with per-sample γ* + Σ_t w_t Δγ_t."""

    def __init__(self, base: nn.Module, current: _CurrentWeights, weight_deltas: torch.Tensor, form: str,
                 eps: float) -> None:
        super().__init__(base, current)
        self.form, self.eps = form, eps
        self.register_buffer("weight_deltas", weight_deltas.to(base.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weights(x, x.dim() - 1)
        if w is None:
            return self.base(x)
        gamma = self._derived_from("gamma", lambda: self.base.weight + w @ self.weight_deltas)
        return rms_norm(x, gamma, self.eps, self.form)


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
        self.top_k = min(DEFAULT_TOP_K, len(self.experts))  # experts mixed in "top_k" mode
        self.last_weights: torch.Tensor | None = None  # (batch, T) weights of the last forward or generate
        self._fixed: torch.Tensor | None = None
        self._current = _CurrentWeights()
        self.wrapped = _install(model, self.experts, factors_by_expert, dense_deltas_by_expert, self._current)
        if router is not None:
            router.eval()

    def set_mode(self, mode: Mode, *, top_k: int | None = None) -> None:
        """Choose "router" (softmax of the router), "hard" (its top-1), "top_k" (its softmax
        renormalised over the ``top_k`` largest) or "fixed" (``set_weights``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if mode != "fixed" and self.router is None:
            raise ValueError(f"mode {mode!r} needs a router; pass router= or use set_weights")
        if top_k is not None:
            if not 1 <= top_k <= len(self.experts):
                raise ValueError(f"top_k must be between 1 and the {len(self.experts)} experts, got {top_k}")
            self.top_k = top_k
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
        self._current.set(None)
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
        probabilities = torch.softmax(logits, dim=-1)
        if self.mode == "top_k":
            kept, index = probabilities.topk(self.top_k, dim=-1)
            return torch.zeros_like(probabilities).scatter(-1, index, kept / kept.sum(-1, keepdim=True))
        return probabilities

    def forward(self, *args, **inputs):
        weights = self.expert_weights(*args, **inputs)
        self.last_weights = weights
        self._current.set(weights)
        try:
            return self.model(*args, **inputs)
        finally:
            self._current.set(None)

    def generate(self, **kwargs):
        """transformers' ``generate`` of the wrapped model with each prompt's expert weights,
        computed once from the prompt (``input_ids``, ``attention_mask``; pad on the left) and held
        for every decoding step; beams and returned sequences repeat their prompt's weights. Takes
        and returns what ``model.generate`` does; ``last_weights`` holds the (batch, T) weights used."""
        if "input_ids" not in kwargs:
            raise ValueError("generate needs input_ids (and attention_mask for a padded batch), as keywords")
        routing = {k: kwargs[k] for k in ("input_ids", "attention_mask") if kwargs.get(k) is not None}
        weights = self.expert_weights(**routing).expand(kwargs["input_ids"].shape[0], -1)
        self.last_weights = weights
        self._current.set(weights, expand=True)
        try:
            with torch.no_grad():
                return self.model.generate(**kwargs)
        finally:
            self._current.set(None)

    def shared_forward(self, *args, **inputs):
        """The plain shared model θ* (every delta off)."""
        self._current.set(None)
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
    for head, embedding in _tied_heads(model, by_module):
        by_module.setdefault(head, {}).setdefault("weight", dict(by_module[embedding]["weight"]))

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


def _tied_heads(model: nn.Module, by_module: dict) -> list[tuple[str, str]]:
    """(head, embedding) for every nn.Linear whose weight is a factored embedding's own parameter
    (``tie_word_embeddings``: the checkpoint stores the matrix, and its factors, once)."""
    embeddings = {}
    for path, params in by_module.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # _install names it
        if isinstance(module, nn.Embedding) and any(isinstance(d, (tuple, Factors)) for d in params.get("weight", {}).values()):
            embeddings[id(module.weight)] = path
    return [(path, embeddings[id(module.weight)]) for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module.weight) in embeddings]


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
                    f"{param!r}; twin inference supports factors on Linear/Conv1D/Embedding weights and dense "
                    "deltas on Linear/Conv1D biases and LayerNorm/RMSNorm weights (LayerNorm biases too)"
                )

    if isinstance(module, nn.Linear):
        check_params({"weight"}, {"bias"})
        return TwinLinear(module, current, factors("weight"), dense("bias"))
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        check_params({"weight"}, {"bias"})
        return TwinLinear(module, current, factors("weight"), dense("bias"), stored_transposed=True)
    if isinstance(module, nn.Embedding):
        check_params({"weight"}, set())
        return TwinEmbedding(module, current, factors("weight"))
    if isinstance(module, nn.LayerNorm):
        check_params(set(), {"weight", "bias"})
        return TwinLayerNorm(module, current, dense("weight"), dense("bias"))
    rms = rms_norm_form(module)
    if rms is not None:
        check_params(set(), {"weight"})
        return TwinRMSNorm(module, current, dense("weight"), *rms)
    raise ValueError(
        f"module {path!r} is a {type(module).__name__} with deltas on {sorted(params)}; twin inference handles "
        "nn.Linear, transformers' Conv1D, nn.Embedding, nn.LayerNorm and RMSNorms of the γ·n(x) or (1+γ)·n(x) "
        "form (checked on a probe input); this module computes neither"
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


def _ranks(factors: list[tuple[torch.Tensor, torch.Tensor] | None]) -> list[int]:
    """Each expert's rank (0 without factors), in expert order."""
    return [0 if pair is None else pair[1].shape[0] for pair in factors]
