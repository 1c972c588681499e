"""Router generation inside transformers' own ``generate`` (docs/router.md, "Generation").

soft / top_k decode the mixture ``log sum_m w_m p_m`` of the routed specialists (docs/design.md section 7) in
``GenerationMixin.generate``: the references below compute that mixture by hand, step by step, from each specialist
loaded alone and without a KV cache, and apply transformers' processors to it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import NAMES, make_router, random_ids
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from hf_localist import LocalistConfigError

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])


def _prompts():
    """Three prompts of length 6, the second left-padded by 2."""
    x = random_ids(3, 6, seed=7)
    mask = torch.ones_like(x)
    x[1, :2], mask[1, :2] = 0, 0
    return x, mask


def _weights(probs: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, M) mixture weights of routing ``mode`` given router probabilities: all of them (soft), the two most
    probable renormalised (top_k with routing_k=2)."""
    if mode == "soft":
        return probs / probs.sum(-1, keepdim=True)
    top = probs.topk(2, dim=-1)
    return torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))


def hand_mixture(zoo, seq: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_m w_m softmax(logits_m) at the last position, each specialist alone on the whole sequence."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    mix = 0
    with torch.no_grad():
        for m, name in enumerate(NAMES):
            logits = zoo.alone[name](input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False).logits
            mix = mix + weights[:, m, None].double() * logits[:, -1].double().softmax(-1)
    return mix.log()


def hand_generate(zoo, x, mask, weights, steps, processors=None, sample=False):
    """Decode the hand mixture ``steps`` tokens: processors on the mixture's log-probabilities, then argmax (or a
    multinomial draw). Transformers hands processors float32 scores: the reference does too."""
    seq = x
    for _ in range(steps):
        scores = hand_mixture(zoo, seq, mask, weights).float()
        if processors is not None:
            scores = processors(seq, scores)
        nxt = torch.multinomial(scores.softmax(-1), 1)[:, 0] if sample else scores.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return seq


@pytest.mark.parametrize("mode", ["soft", "top_k"])
def test_mixture_generation_equals_the_hand_mixture(zoo, mode):
    router = make_router(zoo, mode, routing_k=2)
    x, mask = _prompts()
    out = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=6)
    assert out.tolist() == hand_generate(zoo, x, mask, _weights(PROBS, mode), 6).tolist()
    # the router's own probabilities route the same way as when given explicitly
    probs = router.route(x, mask).router_probs
    assert router.generate(x, attention_mask=mask, max_new_tokens=4).tolist() == \
        hand_generate(zoo, x, mask, _weights(probs, mode), 4).tolist()


def test_generation_config_and_penalties_act_on_the_mixture(zoo):
    router = make_router(zoo, "soft")
    x, mask = _prompts()
    cfg = GenerationConfig(max_new_tokens=6, repetition_penalty=1.4, no_repeat_ngram_size=2)
    out = router.generate(x, attention_mask=mask, router_probs=PROBS, generation_config=cfg)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4), NoRepeatNGramLogitsProcessor(2)])
    assert out.tolist() == hand_generate(zoo, x, mask, _weights(PROBS, "soft"), 6, procs).tolist()
    kwargs = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=6, repetition_penalty=1.4,
                             no_repeat_ngram_size=2)
    assert kwargs.tolist() == out.tolist()
    plain = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=6)
    assert plain.tolist() != out.tolist()  # the penalties changed something: the check above is not vacuous


class ForceAt(LogitsProcessor):
    """Force token ``tok`` when the sequences have length ``at``."""

    def __init__(self, at: int, tok: int):
        self.at, self.tok = at, tok

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -torch.inf)
            scores[:, self.tok] = 0.0
        return scores


class StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class Recorder(BaseStreamer):
    """A streamer that keeps what it is given (TextStreamer decodes the same calls)."""

    def __init__(self):
        self.chunks, self.ended = [], 0

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended += 1


def test_logits_processor_stopping_criteria_and_streamer(zoo):
    router = make_router(zoo, "top_k", routing_k=2)
    x, mask = _prompts()
    force = ForceAt(8, 11)
    out = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=5,
                          logits_processor=LogitsProcessorList([force]))
    assert out[:, 8].tolist() == [11, 11, 11]
    assert out.tolist() == hand_generate(zoo, x, mask, _weights(PROBS, "top_k"), 5,
                                         LogitsProcessorList([force])).tolist()
    stopped = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=8,
                              stopping_criteria=StoppingCriteriaList([StopAtLength(9)]))
    full = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=8)
    assert stopped.shape == (3, 9) and stopped.tolist() == full[:, :9].tolist()
    rec = Recorder()
    one = router.generate(x[:1], router_probs=PROBS[:1], max_new_tokens=4, streamer=rec)
    assert rec.chunks[0] == x[:1].tolist() and rec.ended == 1
    assert [c[0] for c in rec.chunks[1:]] == one[0, 6:].tolist()


def test_mixture_sampling_with_a_seed(zoo):
    router = make_router(zoo, "soft")
    x, mask = _prompts()
    torch.manual_seed(11)
    out = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=6, do_sample=True,
                          temperature=0.8, top_k=30)
    torch.manual_seed(11)
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(30)])
    ref = hand_generate(zoo, x, mask, _weights(PROBS, "soft"), 6, warp, sample=True)
    assert out.tolist() == ref.tolist()
    torch.manual_seed(11)
    again = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=6, do_sample=True,
                            temperature=0.8, top_k=30)
    assert again.tolist() == out.tolist()


def test_mixture_beam_search_reorders_every_specialist_cache(zoo):
    router = make_router(zoo, "soft")
    x, mask = _prompts()
    kw = dict(attention_mask=mask, router_probs=PROBS, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    cached = router.generate(x, **kw)
    assert cached.shape == (6, 11)
    assert cached.tolist() == router.generate(x, use_cache=False, **kw).tolist()  # recomputed: no cache to reorder
    # all the weight on one specialist: its own beam search (the mixture's logits are its log-probabilities)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    alone = zoo.alone["alpha"].generate(x, attention_mask=mask, max_new_tokens=5, num_beams=3,
                                        num_return_sequences=2, pad_token_id=0)
    assert router.generate(x, attention_mask=mask, router_probs=one_hot, max_new_tokens=5, num_beams=3,
                           num_return_sequences=2).tolist() == alone.tolist()


def test_mixture_assisted_decoding_keeps_greedy_output(zoo):
    router = make_router(zoo, "soft")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    greedy = router.generate(x, router_probs=PROBS[:1], max_new_tokens=8)
    lookup = router.generate(x, router_probs=PROBS[:1], max_new_tokens=8, prompt_lookup_num_tokens=3)
    assisted = router.generate(x, router_probs=PROBS[:1], max_new_tokens=8, assistant_model=zoo.alone["alpha"])
    assert lookup.tolist() == greedy.tolist() == assisted.tolist()


def test_scores_come_back_per_step(zoo):
    router = make_router(zoo, "soft")
    x, mask = _prompts()
    out = router.generate(x, attention_mask=mask, router_probs=PROBS, max_new_tokens=3, output_logits=True,
                          output_scores=True, repetition_penalty=1.3, return_dict_in_generate=True)
    assert len(out.logits) == len(out.scores) == 3 and out.logits[0].shape == (3, 100)
    # the raw logits are the mixture's log-probabilities, the scores what the penalty made of them
    torch.testing.assert_close(out.logits[0].double(), hand_mixture(zoo, x, mask, _weights(PROBS, "soft")),
                               atol=1e-5, rtol=0)
    assert not torch.equal(out.scores[1], out.logits[1])
    hard = make_router(zoo, "hard")
    res = hard.generate(x, attention_mask=mask, route_to=["alpha", "beta", "alpha"], max_new_tokens=3,
                        output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        beta = zoo.alone["beta"].generate(x[1:2], attention_mask=mask[1:2], max_new_tokens=3, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=0)
    assert res.sequences[1].tolist() == beta.sequences[0].tolist()
    torch.testing.assert_close(res.logits[2][1], beta.logits[2][0])


def test_hard_routing_returns_every_sequence_of_each_group(zoo):
    router = make_router(zoo, "hard")
    x, mask = _prompts()
    out = router.generate(x, attention_mask=mask, route_to=["alpha", "beta", "alpha"], max_new_tokens=4,
                          num_beams=2, num_return_sequences=2)
    alone = zoo.alone["beta"].generate(x[1:2], attention_mask=mask[1:2], max_new_tokens=4, num_beams=2,
                                       num_return_sequences=2, pad_token_id=0)
    assert out.shape == (6, 10) and out[2:4].tolist() == alone.tolist()


@pytest.mark.parametrize("kwargs, needle", [
    ({"cache": DynamicCache()}, "'cache'"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
    ({"block_ids": torch.zeros(3, 6, dtype=torch.long)}, "block_ids"),
    ({"generation_config": {"max_new_tokens": 3}}, "GenerationConfig"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_what_a_mixture_refuses_is_named(zoo, kwargs, needle):
    router = make_router(zoo, "soft")
    x, mask = _prompts()
    with pytest.raises(LocalistConfigError, match=needle):
        router.generate(x, attention_mask=mask, **{"max_new_tokens": 2, **kwargs})
