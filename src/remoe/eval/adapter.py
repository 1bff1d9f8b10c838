"""lm-eval adapter for remoe checkpoints, registered as model name "remoe".

`loglikelihood` batches requests sorted by length (longest first, right-padded, one forward per batch),
left-truncates context+continuation to the model's context the way lm-eval's HF model does, and reports
is_greedy = every continuation token is the argmax. `loglikelihood_rolling` scores documents in
lm-eval's disjoint rolling windows; `generate_until` decodes greedily.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data.tokenizer import eos_id
from ..model import Transformer

DTYPES = {"float32": None, "32-true": None, "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
          "float16": torch.float16, "16-mixed": torch.float16}


@torch.no_grad()
def greedy_decode(score, ids: list[int], max_new: int, max_length: int, eos: int | None = None,
                  stop=lambda new: False) -> list[int]:
    """This project's greedy decoding: up to max_new argmax tokens after `ids` (each step scores the last
    max_length tokens with score(ids (1, S)) -> (1, S, V) logits or log-probs), ending before `eos` or
    after the token for which stop(new tokens) is true."""
    new: list[int] = []
    for _ in range(max_new):
        window = (ids + new)[-max_length:]
        nxt = int(score(torch.tensor([window]))[0, -1].argmax())
        if nxt == eos:
            break
        new.append(nxt)
        if stop(new):
            break
    return new


@register_model("remoe")
class RemoeLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, model: Transformer | None = None,
                 tokenizer: Tokenizer | None = None, device: str = "cpu", batch_size: int | str = 16,
                 max_length: int | None = None, dtype: str = "float32", **kwargs):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("remoe: pass model_args checkpoint=PATH")
            model, tokenizer, _ = load_checkpoint(checkpoint)
        if dtype not in DTYPES:
            raise ValueError(f"remoe: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI defaults to --device cuda; on a CPU-only machine run where we can

            logging.getLogger("remoe").warning("remoe: CUDA is not available, evaluating on CPU")
            device = "cpu"
        self._device = torch.device(device or "cpu")
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        self.max_length = int(max_length or model.cfg.max_seq_len)
        self.autocast = DTYPES[dtype]

    @property
    def eot_token_id(self) -> int:
        return eos_id(self.tokenizer)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self._device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            logits = self.model(batch.to(self._device)).logits
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """requests: [((context, continuation), context_ids, continuation_ids)] -> [(logprob, is_greedy)]."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        bs = override_bs or self.batch_size
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), bs), disable=disable_tqdm, desc="remoe loglikelihood"):
            idx = order[start : start + bs]
            inps, cont_lens = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                # left-truncate to the context window; the last token is only ever a target
                inps.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                cont_lens.append(len(cont))
            width = max(len(x) for x in inps)
            batch = torch.zeros(len(inps), width, dtype=torch.long)
            for r, x in enumerate(inps):
                batch[r, : len(x)] = torch.tensor(x)
            logp = self._logprobs(batch)
            for r, i in enumerate(idx):
                n, k = len(inps[r]), cont_lens[r]
                cont = torch.tensor(requests[i][2][-k:])
                lp = logp[r, n - k : n]
                greedy = bool((lp.argmax(-1) == cont).all())
                ans = (float(lp.gather(1, cont[:, None]).sum()), greedy)
                out[i] = ans
                if requests[i][0] is not None and requests[i][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for j, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(j)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for j, (lp, _) in zip(owner, scores):
            totals[j] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="remoe generate"):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 64))
            ids = self.tok_encode(context)[-(self.max_length - 1) :]
            new = greedy_decode(self._logprobs, ids, max_new, self.max_length, eos=self.eot_token_id,
                                stop=lambda new, until=until: any(s in self.tok_decode(new) for s in until))
            text = self.tok_decode(new)
            for s in until:
                text = text.split(s)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results
