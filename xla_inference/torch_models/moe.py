"""vLLM's fused MoE layers on our JAX experts.

vLLM builds every mixture-of-experts block's experts as a `MoERunner` (FusedMoEFactory,
vllm/model_executor/layers/fused_moe/layer.py): a router (top-k over the router logits), the
expert weights on its `routed_experts` (w13 [E, 2F, D]: each expert's gate rows then its up
rows; w2 [E, D, F]) and a forward that reaches vLLM's CUDA/CPU kernels through a custom op,
which torchax cannot lower. At lowering, each runner's forward is replaced by
`FusedMoeForward`, which routes as layers/moe.py does (`softmax_top_k`, or DeepSeek-V3's
`grouped_sigmoid_top_k`) and runs the chosen experts through layers/moe.routed_mlp: the
native families' grouped matmuls (the Pallas GMM on a TPU or GPU, kernels/xla_gmm.py's loop
or jax.lax.ragged_dot on the CPU). The step's padding rows (AttentionMetadata.real_tokens,
read from the step being traced: torch_models/step.step_real_tokens) route to no expert
as the native families' do (layers/moe.without_padding): they take no rows of any group.

The expert weights are laid out once, at load, as the native families keep them: w13 split
into w_gate and w_up [E, D, F] and w2 transposed to w_down [E, F, D], registered on the
routed experts module in place of w13/w2, so that the step reads them without a transpose
and parallel/sharding.py splits them over the experts axis like the native ones.

Served: softmax top-k routing, renormalised or not (Mixtral, Qwen3-MoE, OLMoE, ...);
sigmoid scores with a correction bias, in groups or not, renormalised or not, scaled
(GLM-4.5, DeepSeek-V3's routing); SiLU gated experts, unquantized, no bias; shared experts
beside the routed ones (Qwen2-MoE's gated one, GLM-4.5's: vLLM's own modules, lowered like
any other). Everything else vLLM's runner can do is refused by name when the model is
loaded (`refusals`), never served wrong."""

from __future__ import annotations

import torch

from xla_inference.layers.moe import (MoeConfig, MoeMlp, grouped_sigmoid_top_k, routed_mlp,
                                      softmax_top_k)

# vLLM's routers FusedMoeForward does not compute, by class name: what each does.
_ROUTER_VARIANTS = {
    "CustomRoutingRouter": "a custom routing function",
    "ZeroExpertRouter": "zero experts",
    "RoutingSimulatorRouter": "simulated routing",
    "AiterSharedRoutedFusedMoERouter": "ROCm aiter fused shared-expert routing",
}


def routing(router) -> str | None:
    """How a vLLM router routes, as layers/moe.py names it ("softmax": top-k over a
    softmax; "grouped_sigmoid": DeepSeek-V3's sigmoid scores with a correction bias, in
    groups or not), or None: not one we compute."""
    kind = type(router).__name__
    scoring = getattr(router, "scoring_func", None)
    if kind == "FusedTopKRouter" and scoring == "softmax":
        return "softmax"
    if (kind in ("GroupedTopKRouter", "FusedTopKBiasRouter") and scoring == "sigmoid"
            and router.e_score_correction_bias is not None):
        return "grouped_sigmoid"
    return None


def _router_refusals(router) -> list[str]:
    """What a router does that we do not; empty where `routing` names its kind."""
    kind, scoring = type(router).__name__, getattr(router, "scoring_func", None)
    has_bias = getattr(router, "e_score_correction_bias", None) is not None
    found = []
    if routing(router) is None:
        if kind in _ROUTER_VARIANTS:
            found.append(_ROUTER_VARIANTS[kind])
        elif kind == "GroupedTopKRouter":
            found.append(f"grouped top-k routing over {scoring} scores"
                         + ("" if has_bias else " without a score correction bias"))
        elif kind in ("FusedTopKRouter", "FusedTopKBiasRouter"):
            found.append(f"{scoring} scoring of the router "
                         + ("with" if has_bias else "without") + " a score correction bias")
        else:
            found.append(f"routing by {kind}")
    return found + [reason for present, reason in (
        (getattr(router, "eplb_state", None) is not None, "expert parallel load balancing (EPLB)"),
        (getattr(router, "bias_vl", None) is not None, "vision routing biases"),
        (getattr(router, "_hash_indices_table", None) is not None, "hash routing"),
        (getattr(router, "num_fused_shared_experts", 0) > 0,
         "shared experts fused into the routed ones"),
    ) if present]


def refusals(runner) -> list[str]:
    """What one vLLM MoE runner does that FusedMoeForward does not (empty: served)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    if type(runner) is not MoERunner:
        return [f"MoE runners of kind {type(runner).__name__}"]
    experts, moe = runner.routed_experts, runner.moe_config
    found = _router_refusals(runner.router)
    found += [reason for present, reason in (
        (runner.shared_expert_gate is not None,
         "a shared expert gate fused with the router"),
        (runner.routed_input_transform is not None
         or runner.routed_output_transform is not None, "latent MoE transforms"),
        (routing(runner.router) == "softmax"
         and getattr(experts, "routed_scaling_factor", 1.0) != 1.0,
         "a routed scaling factor with softmax routing"),
        (getattr(experts, "apply_router_weight_on_input", False),
         "router weights applied to the expert inputs"),
        (moe.activation != MoEActivation.SILU, f"{moe.activation.value} experts"),
        (moe.has_bias, "expert biases"),
        (any(getattr(moe, f"swiglu_{n}") is not None for n in ("limit", "alpha", "beta")),
         "clamped or scaled SwiGLU experts"),
        (moe.intermediate_pad, "padded expert widths"),
        (moe.moe_parallel_config.ep_size > 1, "expert parallel ranks"),
        (type(experts.quant_method) is not UnquantizedFusedMoEMethod, "quantized experts"),
    ) if present]
    return list(dict.fromkeys(found))  # each reason once


def moe_runners(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, runner) of every vLLM MoE runner of a model, in module order."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import (
        MoERunnerInterface,
    )

    return [(n, m) for n, m in module.named_modules() if isinstance(m, MoERunnerInterface)]


def _relayout_experts(experts: torch.nn.Module, num_experts: int, width: int) -> None:
    """w13 [E, 2F, D] / w2 [E, D, F] -> w_gate, w_up [E, D, F] and w_down [E, F, D]
    (layers/moe.MoeMlp's layout); the torch copies of w13 and w2 are dropped."""
    w13, w2 = experts.w13_weight.detach(), experts.w2_weight.detach()
    if w13.shape[:2] != (num_experts, 2 * width) or w2.shape[::2] != (num_experts, width):
        raise NotImplementedError(f"xla-inference's torch path expects experts w13 "
                                  f"[{num_experts}, {2 * width}, D] and w2 [{num_experts}, D, "
                                  f"{width}], not {tuple(w13.shape)} and {tuple(w2.shape)}")
    layout = {"w_gate": w13[:, :width].transpose(1, 2), "w_up": w13[:, width:].transpose(1, 2),
              "w_down": w2.transpose(1, 2)}
    del experts.w13_weight, experts.w2_weight
    for name, value in layout.items():
        experts.register_parameter(name, torch.nn.Parameter(value.contiguous(),
                                                            requires_grad=False))


def relayout_experts(forward: FusedMoeForward) -> None:
    """One runner's loaded experts in our layout (_relayout_experts)."""
    _relayout_experts(forward.experts, forward.cfg.num_experts, forward.cfg.intermediate_size)


class FusedMoeForward:
    """Replaces one vLLM MoERunner's forward: hidden_states [T, D] and router_logits
    [T, E] (or, where the runner holds the gate, hidden_states again) -> [T, D]."""

    def __init__(self, runner, score_bias=None):
        """score_bias: () -> the router's score correction bias as the step sees it (the
        module attribute functional_call fills), for "grouped_sigmoid" routing."""
        moe = runner.moe_config
        self.gate = runner.gate  # the router projection, when the runner applies it itself
        self.experts = runner.routed_experts
        # The shared experts (Qwen2-MoE's, gated or not): a plain module of the model,
        # which vLLM's SharedExperts wrapper calls on the same input as the routed experts.
        shared = runner.shared_experts
        self.shared_experts = None if shared is None else shared._layer
        router = runner.router
        self.cfg = MoeConfig(num_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                             intermediate_size=moe.intermediate_size_per_partition,
                             norm_topk_prob=router.renormalize, scoring=routing(router),
                             num_groups=getattr(router, "num_expert_group", None) or 1,
                             topk_groups=getattr(router, "topk_group", None) or 1,
                             routed_scaling_factor=getattr(router, "routed_scaling_factor", 1.0))
        self.score_bias = score_bias
        # Scales the routed output (apply_routed_scale_to_output), as the runner does.
        self.output_scale = runner.routed_scaling_factor

    def __call__(self, hidden_states, router_logits, input_ids=None, shared_experts_input=None):
        from xla_inference.torch_models.step import from_torch, step_real_tokens, to_torch

        if self.gate is not None:
            router_logits = self.gate(hidden_states)
            if isinstance(router_logits, tuple):  # (output, bias) of vLLM's linear layers
                router_logits = router_logits[0]
        x, logits = from_torch((hidden_states, router_logits))
        weights, chosen = self._route(logits)
        e = self.experts
        p = MoeMlp(router=None, w_gate=from_torch(e.w_gate), w_up=from_torch(e.w_up),
                   w_down=from_torch(e.w_down))
        # The step's padding rows routed to no expert, as the native families route them.
        real = step_real_tokens(x.shape[0])
        routed = to_torch(routed_mlp(p, x, weights, chosen, self.cfg, real))
        if self.shared_experts is None:
            return routed * self.output_scale if self.output_scale != 1.0 else routed
        shared_input = hidden_states if shared_experts_input is None else shared_experts_input
        shared = self.shared_experts(shared_input)
        if self.output_scale != 1.0:
            # vLLM's runner: float16 divides the shared output instead (the decoder layer
            # of such models compensates); other dtypes scale the routed output.
            if routed.dtype == torch.float16:
                shared = shared * (1.0 / self.output_scale)
            else:
                routed = routed * self.output_scale
        return shared + routed

    def _route(self, logits):
        cfg = self.cfg
        if cfg.scoring == "grouped_sigmoid":
            from xla_inference.torch_models.step import from_torch

            return grouped_sigmoid_top_k(logits, from_torch(self.score_bias()), cfg)
        return softmax_top_k(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)


def _tensor_owners(module: torch.nn.Module) -> dict:
    """id(tensor) -> () -> that attribute of its module now: under functional_call, the
    step's value, where a reference kept elsewhere (vLLM's router keeps its bias) would
    still hold the loaded tensor."""
    owners = {}
    for owner in module.modules():
        for attr, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None:
                owners.setdefault(id(tensor), lambda o=owner, a=attr: getattr(o, a))
    return owners


def install(module: torch.nn.Module, refuse, relayout: bool = True) -> list[FusedMoeForward]:
    """Point every MoE runner of `module` (moe_runners' order) at our experts. A runner
    doing anything we do not serve is refused (refuse(what) -> the exception) before any
    module is changed. relayout=False: the experts are not loaded yet; lay each runner's
    out with `relayout_experts` once they are (torch_models/layerwise.py)."""
    runners = moe_runners(module)
    owners = _tensor_owners(module)
    for name, runner in runners:
        found = refusals(runner)
        bias = getattr(runner.router, "e_score_correction_bias", None)
        if bias is not None and id(bias) not in owners:
            found.append("a score correction bias that is no tensor of the model")
        if found:
            raise refuse(f"{', '.join(found)} in vLLM's fused MoE ({name}: "
                         f"{type(runner).__name__})")
    forwards = []
    for _, runner in runners:
        bias = getattr(runner.router, "e_score_correction_bias", None)
        forward = FusedMoeForward(runner, None if bias is None else owners[id(bias)])
        if relayout:
            relayout_experts(forward)
        runner.forward = forward
        forwards.append(forward)
    return forwards
