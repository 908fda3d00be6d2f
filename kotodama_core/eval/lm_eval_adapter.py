"""lm-eval model `kotodama`: a TemplateLM over KotodamaLM checkpoints.

Importing this module registers the model, so `simple_evaluate(model="kotodama", ...)` works after
`import kotodama_core.eval.lm_eval_adapter`, and `kotodama lm-eval --model kotodama --model_args
checkpoint=PATH --tasks piqa` runs lm-eval's own command line with it registered.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from kotodama_core.config_tree import load_tree
from kotodama_core.eval.generate import generate_tokens
from kotodama_core.eval.loading import load_checkpoint_model, select_device, select_dtype
from kotodama_core.eval.scoring import continuation_logprobs, strided_token_nll
from kotodama_core.eval.tokenizer import eos_id, load_eval_tokenizer
from kotodama_core.model.config import KotodamaConfig

log = logging.getLogger(__name__)
DEFAULT_TOKENIZER = "../shared/data/smollm2-tokenizer/tokenizer.json"


def _int_or_none(value: Any) -> int | None:
    if value is None or value in ("", "None", "auto"):
        return None
    return int(value)


@register_model("kotodama")
class KotodamaEvalLM(TemplateLM):
    """Scores with a KotodamaLM: batched loglikelihood, strided rolling loglikelihood, sampling.

    model_args: checkpoint (training artifact folder or .pt.zst), config (run config YAML, only for a
    bare state dict), tokenizer, batch_size, max_length, stride, device, dtype, temperature,
    max_gen_tokens, seed. A built model can be passed as `model=` (with `tokenizer=` as an object).
    """

    def __init__(self, checkpoint: str | None = None, config: str | None = None,
                 tokenizer: Any = DEFAULT_TOKENIZER, batch_size: Any = 16, max_length: Any = None,
                 stride: Any = 64, device: str | None = "auto", dtype: str = "auto", temperature: Any = 1.0,
                 max_gen_tokens: Any = 256, seed: Any = 1234, model: torch.nn.Module | None = None,
                 **unused: Any):
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"kotodama model: unknown model_args {sorted(unused)}")
        self._device = select_device(device or "auto")
        if model is None:
            if checkpoint is None:
                raise ValueError("kotodama model needs model_args checkpoint=<artifact folder or .pt.zst>")
            model_cfg = KotodamaConfig.model_validate(load_tree(config).get("model", {})) if config else None
            model, _ = load_checkpoint_model(checkpoint, model_cfg, device=self._device,
                                             dtype=select_dtype(dtype, self._device))
        self.model = model.eval()
        self.tokenizer = load_eval_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._eot = eos_id(self.tokenizer)
        self._batch_size = _int_or_none(batch_size) or 16
        self._max_length = _int_or_none(max_length) or self.model.cfg.max_position_embeddings
        if self._max_length > self.model.cfg.max_position_embeddings:
            raise ValueError(f"max_length {self._max_length} exceeds the model's "
                             f"max_position_embeddings {self.model.cfg.max_position_embeddings}")
        self._stride = min(int(stride), self._max_length)
        self._temperature = float(temperature)
        self._max_gen_tokens = int(max_gen_tokens)
        self._seed = int(seed)

    # ------------------------------------------------------------------ TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = continuation_logprobs(self.model, pairs, max_length=self._max_length,
                                        batch_size=self._batch_size, device=self._device)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req[0], res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ_t log p(x_t | up to max_length previous tokens) over the whole text, the first token
        conditioned on end-of-text, windows advanced by `stride` tokens."""
        out = []
        for req in requests:
            (text,) = req.args
            tokens = [self._eot] + self.tok_encode(text)
            nll, _ = strided_token_nll(self.model, tokens, max_length=self._max_length, stride=self._stride,
                                       device=self._device, batch_size=self._batch_size)
            value = -float(nll.sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
            out.append(value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Pure temperature sampling (top-p / top-k are refused: they hurt small models' text)."""
        out = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self._max_gen_tokens))
            temperature = float(gen_kwargs.pop("temperature", self._temperature))
            if not gen_kwargs.pop("do_sample", True):
                temperature = 0.0
            for key in ("top_p", "top_k"):
                if gen_kwargs.pop(key, None) not in (None, 1.0, 0, -1):
                    log.warning("kotodama: %s ignored; generation uses pure temperature sampling", key)
            prompt = self.tok_encode(context) or [self._eot]

            def hit_stop(tokens: list[int]) -> bool:
                text = self.tok_decode(tokens)
                return any(s in text for s in until)

            tokens = generate_tokens(self.model, prompt, max_new_tokens=max_new, temperature=temperature,
                                     stop_ids={self._eot}, seed=self._seed + n,
                                     stop_check=hit_stop if until else None)
            text = self.tok_decode(tokens)
            for s in until:
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out
