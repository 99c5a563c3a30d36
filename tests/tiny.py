"""The tiny models, tokenizer and helpers every test shares (random init, fp32, CPU, fixed seeds).

``conftest.py`` turns the builders into fixtures; tests import helpers from here, never from a
sibling test file.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.numerics import rel_err

VOCAB = 97

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges in order; each result is also a vocab entry. "Ġ" is the byte-level symbol for a space.
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("r", "e"), ("d", "e"), ("de", "f"),
    ("re", "t"), ("u", "r"), ("ret", "ur"), ("retur", "n"), ("Ġ", "return"),
    ("a", "m"), ("n", "am"), ("nam", "e"), ("Ċ", "Ġ"), ("ĊĠ", "Ġ"),
]
CHAT_TEMPLATE = (  # SmolLM2-Instruct's template (ChatML with a default system message)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer described in the module docstring (deterministic)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    vocab_size: int, *, attn_implementation: str = "sdpa", seed: int = 0, tie_word_embeddings: bool = False
) -> LlamaForCausalLM:
    """Random-init Llama: hidden 32, 2 layers, 4 heads, 2 KV heads, MLP 64, fp32, train mode off."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).to(torch.float32).eval()



def llama(seed: int = 0, *, vocab: int = VOCAB, hidden: int = 32, intermediate: int = 64, layers: int = 2,
          positions: int = 128, **config: Any) -> LlamaForCausalLM:
    """A random-init Llama (4 heads, 2 KV heads), eval mode; ``config`` overrides LlamaConfig fields."""
    torch.manual_seed(seed)
    options: dict[str, Any] = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=positions, tie_word_embeddings=False,
    )
    options.update(config)
    return LlamaForCausalLM(LlamaConfig(**options)).eval()


# Families the generation engine runs besides Llama, each with what sets it apart switched on.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "Mistral": dict(sliding_window=5),  # the window on the config only
    "Qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),  # layer 1 slides
    "Qwen3": dict(),  # q_norm / k_norm per head
    "Gemma": dict(),  # embeddings scaled by sqrt(hidden)
    "Gemma2": dict(sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=12),
    "Gemma3": dict(sliding_window=5, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"]),
}


def family_lm(family: str, seed: int = 0, *, vocab: int = VOCAB, **config: Any) -> nn.Module:
    """A random-init ``<family>ForCausalLM`` (hidden 32, 2 layers, 4 heads of 8, 2 KV heads, eager
    attention), eval mode, with :data:`FAMILY_CONFIGS`' features; ``config`` overrides fields."""
    import transformers

    options: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
    )
    options.update(FAMILY_CONFIGS[family], **config)
    config_class = getattr(transformers, "Gemma3TextConfig" if family == "Gemma3" else f"{family}Config")
    built = config_class(**options)
    built._attn_implementation = "eager"
    torch.manual_seed(seed)
    return getattr(transformers, f"{family}ForCausalLM")(built).eval()  # type: ignore[no-any-return]


def gpt2(seed: int = 0, *, vocab: int = VOCAB, positions: int = 64, **config: Any) -> GPT2LMHeadModel:
    """A random-init GPT-2 (n_embd 32, 2 layers, 4 heads), eval mode."""
    torch.manual_seed(seed)
    options: dict[str, Any] = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=positions)
    options.update(config)
    return GPT2LMHeadModel(GPT2Config(**options)).eval()


def lora_llama(*, dropout: float = 0.0, targets: str | tuple[str, ...] = "all-linear",
               dtype: torch.dtype = torch.float32, device: str = "cpu", layers: int = 2,
               hidden: int = 64) -> nn.Module:
    """A frozen Llama (vocab 101, sdpa) with r4 LoRA on ``targets`` whose B are non-zero."""
    from splice.lora.apply import add_lora, lora_modules
    from splice.lora.freeze import freeze
    from splice.lora.layers import LoraConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                         max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=targets, dropout=dropout))
    for _, _, layer in lora_modules(model):  # non-zero B: the adapters change the output
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    freeze(model)
    return model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))


def tokens(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def randomize_lora(model: nn.Module, seed: int = 3) -> None:
    """Give every LoRA B (and embedding A) non-zero values so adapters change the output."""
    from splice.lora.apply import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in lora_modules(model):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_lora(base: nn.Module, *, seed: int = 5, **config: Any) -> Any:
    """``peft.get_peft_model(base, peft.LoraConfig(**config))`` with random non-zero LoRA weights, eval mode
    (the reference a splice reader or bank is compared with)."""
    import peft

    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model.eval()


def spread_dora_magnitudes(model: nn.Module, seed: int = 0) -> None:
    """Set every DoRA magnitude on ``model`` (splice's layers or PEFT's) to 0.6-1.4 x its row norm of
    ``W + s B A``, a trained adapter's spread (random ones, as :func:`randomize_lora` gives, swamp the model)."""
    import peft

    from splice.lora.apply import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.Linear) and module.use_dora.get("default"):
                delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                norm = torch.linalg.norm(module.base_layer.weight + delta, dim=1)
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.copy_(norm * (0.6 + 0.8 * torch.rand(norm.shape, generator=g)))
        for _, _, layer in lora_modules(model):
            if hasattr(layer, "lora_magnitude_vector"):
                norm = layer.weight_norm()
                layer.lora_magnitude_vector.copy_(norm * (0.6 + 0.8 * torch.rand(norm.shape, generator=g)))


def loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a: tuple[torch.Tensor, dict[str, torch.Tensor]], b: tuple[torch.Tensor, dict[str, torch.Tensor]],
                tol: float = 1e-6) -> None:
    assert rel_err(b[0], a[0]) < tol
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        assert rel_err(b[1][name], a[1][name]) < tol, name


def spy_causal_only(monkeypatch) -> list[bool]:  # type: ignore[no-untyped-def]
    """The causal_only setting each FusedRopeAttention call sees, in call order."""
    from splice.core.context import is_causal_only
    from splice.fused.modules import FusedRopeAttention

    seen: list[bool] = []
    real_forward = FusedRopeAttention.forward

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(is_causal_only())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(FusedRopeAttention, "forward", spy)
    return seen


def write_run_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny Llama + tokenizer folder and a 48-row question/answer JSONL it can learn quickly."""
    import json

    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    with torch.no_grad():  # at init the logits are nearly uniform; a sharper head can learn fast
        model.lm_head.weight.mul_(25)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with (root / "data.jsonl").open("w") as f:
        for i in range(48):
            a, b = words[i % 8], words[(i * 3) % 8]
            f.write(json.dumps({"question": f"{a} then {b}?", "answer": f"{b} {a}"}) + "\n")
    return root / "model", root / "data.jsonl"


def run_config(inputs: tuple[Path, Path], out: Path, **overrides: Any) -> Any:
    """A TrainConfig for :func:`write_run_inputs`' model and data: 12 quick steps, checkpoints every 4."""
    from splice.training.config import TrainConfig

    model, data = inputs
    options = dict(
        model=str(model), data=str(data), prompt_template="Q: {question}\nA: ",
        response_template="{answer}", output_dir=str(out), steps=12, lr=1e-2, rank=8, alpha=16,
        dropout=0.1, batch_size=4, max_length=64, eval_samples=0, compare_base=False,
        save_every=4, warmup_steps=2, pack=False,
    )
    options.update(overrides)
    return TrainConfig(**options)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python: the repository first on PYTHONPATH, the caller's
    PYTHONPATH kept after it (on the device the carried wheels live there), plus ``extra``."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for test servers and rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_losses(model: nn.Module, ids: torch.Tensor, *, steps: int = 8, lr: float = 1e-2,
                 autocast: torch.dtype | None = None) -> list[float]:
    """Train ``model``'s trainable parameters on ``ids`` (labels = inputs) for ``steps`` AdamW steps;
    the loss of each step (``autocast``: run the forward under autocast in that dtype)."""
    import contextlib

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        cast = torch.autocast(ids.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with cast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def greedy_loop(model: nn.Module, prompt: list[int], max_tokens: int, eos: Collection[int] = (2,)) -> list[int]:
    """The slow generation reference: argmax of ``model(whole sequence)`` each token, no cache, EOS excluded."""
    ids, out = list(prompt), []
    device = next(model.parameters()).device  # the model may sit on the GPU
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            ids.append(token)
    return out


def penalized_loop(model: nn.Module, prompt: list[int], max_tokens: int, *, presence: float, frequency: float,
                   eos: Collection[int] = (2,)) -> list[int]:
    """:func:`greedy_loop` with OpenAI's penalties on each step's logits: ``logit_j - frequency * count_j
    - presence * (count_j > 0)``, counting the generated tokens."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            token = int(logits.argmax())
            if token in eos:
                break
            out.append(token)
            ids.append(token)
    return out
