"""What a request will cost before it is made: declared prices times tokens.

A model's price list (USD per million input and output tokens) and the request's length
give most of its cost in advance; only the answer's length is unknown. The policies take
this per-request estimate (``cost_estimate`` of :meth:`bandit.base.Policy.decide`) and
learn only a correction on top of it, so no exploration is spent learning prices.
"""

from __future__ import annotations

import math

from bandit.base import check_finite_number

__all__ = ["CHARS_PER_TOKEN", "DEFAULT_OUTPUT_TOKENS", "prompt_tokens", "request_cost"]

#: Characters per token when only the text is known (the usual ~4 for English).
CHARS_PER_TOKEN = 4
#: Output tokens assumed for a request when nothing better is known: a typical chat
#: answer (a few paragraphs). The learned price correction absorbs the difference
#: between this assumption and a model's real answer lengths.
DEFAULT_OUTPUT_TOKENS = 300


def prompt_tokens(text: str) -> int:
    """``ceil(len(text) / 4)``: the usual ~4 characters per token.

    >>> prompt_tokens("What is 2 + 2?")
    4
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def request_cost(input_price_per_mtok: float, output_price_per_mtok: float,
                 input_tokens: float, output_tokens: float) -> float:
    """USD cost of one request from prices (USD per million tokens) and token counts.

    >>> request_cost(0.2, 0.6, input_tokens=1000, output_tokens=500)
    0.0005
    >>> request_cost(0.2, 0.6, input_tokens=-1, output_tokens=0)
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: input_tokens: must be a finite number >= 0.0 (got -1)
    """
    values = {"input_price_per_mtok": input_price_per_mtok,
              "output_price_per_mtok": output_price_per_mtok,
              "input_tokens": input_tokens, "output_tokens": output_tokens}
    p_in, p_out, t_in, t_out = (check_finite_number(k, v, low=0.0) for k, v in values.items())
    return round((p_in * t_in + p_out * t_out) / 1e6, 15)
