"""What keeps the embedded model's replies usable beyond validation: the grammar's query patterns and the logit bias
against the worked examples' words (steering.py), with llama.cpp's own tokenizer and the embedded model."""

import json
import re

import pytest

from components.generate_queries import DEFAULT_CONTEXT, GenerationSettings, GenerationTuning, embedded_gguf_path
from components.generate_queries.cache import row_cache_key
from components.generate_queries.llm import generation_kwargs, parse_llm_spec, response_format_for
from components.generate_queries.prompts import build_messages, grammar_pattern, output_schema, styles
from components.generate_queries.steering import (
    EXAMPLE_WORD_BIAS,
    ExampleWordBias,
    banned_words,
    example_words,
)
from components.generate_queries.validation import copies_example
from components.settings import build

# A hard chunk for a 135M model: the end of a version table on the Kubeflow 1.10 release page (Kubeflow website docs,
# CC BY 4.0, as in benchmarks/data). Without the bias the embedded model copied a worked example in all three attempts.
HARD_CHUNK = {
    "anchor": 'docs/eventing/">Knative Eventing</a>\n        </td>\n        <td>1.16.4</td>\n      </tr>\n      \n'
              '      \n      \n      <tr>\n        <td>\n          <a href="https://github.com/oauth2-proxy/oauth2-proxy'
              '/releases/tag/v7.6.0">OAuth2 Proxy</a>\n        </td>\n        <td>7.7.1</td>\n      </tr>\n  </tbody>\n'
              '</table>\n</div>',
    "url": "https://www.kubeflow.org/docs/kubeflow-distribution/releases/kubeflow-1.10/",
}


@pytest.mark.parametrize("style", sorted(styles()))
def test_the_grammar_never_lets_a_query_hold_a_raw_quote_or_backslash(style):
    # llama.cpp applies the pattern to the raw text between the JSON quotes: a quote inside a query ended the string
    # early and the reply no longer parsed ('{"positive": "What is x", "negative": "y?", ...').
    pattern = grammar_pattern(styles()[style]["pattern"])
    well_formed = {"question": "What is the cache of a stage?", "keywords": "stage task cache",
                   "statement": "I want a stage served from the cache."}[style]
    assert re.fullmatch(pattern, well_formed)
    for bad in ('"', "\\"):
        assert not re.fullmatch(pattern, well_formed[:12] + bad + well_formed[12:])
    assert output_schema(style)["properties"]["positive"]["pattern"] == pattern


@pytest.mark.parametrize(("style", "text", "fits"), [
    ("keywords", "db dump backup all tables", True),
    ("keywords", "tensorflow-cuda image", True),
    ("keywords", "tensorflow-cuda", False),  # one word: the prompt asks for 2 to 6
    # The embedded model wrote sentences as searches; the old pattern cut them at 61 characters.
    ("keywords", "katib is a new algorithm that supports early stopping", False),
    ("statement", "I need the v1.2 client for my pipeline.", True),
    ("statement", "I have a question about katib. I need to tune my model.", False),  # two sentences
    ("statement", "I want to run it! It fails on start.", False),
])
def test_the_pattern_holds_a_keyword_search_to_2_to_6_words_and_a_statement_to_one_sentence(style, text, fits):
    # Measured on the Kubeflow test split: 40 of 95 kept keyword searches and 20 of 99 statements were not of
    # their style under the old patterns.
    for pattern in (styles()[style]["pattern"], grammar_pattern(styles()[style]["pattern"])):
        assert bool(re.fullmatch(pattern, text)) is fits


def test_validation_still_takes_a_quoted_word_from_an_api_model():
    # The plain pattern (validation) keeps accepting what a strong LLM writes with JSON escapes.
    assert re.fullmatch(styles()["statement"]["pattern"], 'I get "permission denied" when I upload a pipeline.')


def test_example_words_are_the_examples_topic_words_not_query_words():
    words = example_words()
    assert {"dump", "tables", "handler", "certificate", "template"} <= set(words)
    assert not {"how", "what", "which", "need", "want", "the", "with"} & set(words)


def test_banned_words_are_the_example_words_the_prompt_does_not_use():
    banned = banned_words("Topic: Rendering tables\nExcerpt: each table is rendered by the server")
    assert "dump" in banned and "certificate" in banned
    # The prompt uses them, or a word with the same first five letters (tables/table, render/rendered).
    assert not {"table", "tables", "render", "server"} & set(banned)


def test_the_bias_covers_every_single_token_spelling_of_a_banned_word():
    from llama_cpp import Llama

    model = Llama(model_path=str(embedded_gguf_path()), vocab_only=True, verbose=False)
    bias = ExampleWordBias(model.tokenize)("Topic: Rendering tables\nExcerpt: each table is rendered by the server")
    assert set(bias.values()) == {EXAMPLE_WORD_BIAS}
    for spelling in (" dump", " certificate", " handler"):
        tokens = model.tokenize(spelling.encode(), add_bos=False, special=False)
        if len(tokens) == 1:
            assert str(tokens[0]) in bias
    for allowed in (" table", " server"):
        tokens = model.tokenize(allowed.encode(), add_bos=False, special=False)
        assert not {str(token) for token in tokens} & set(bias)


def test_the_embedded_model_copies_a_worked_example_only_without_the_bias():
    # Measured on the 20 Kubeflow chunks whose generation failed as copies: without the bias 31 of 60 replies copied
    # an example, with it none. With the bias the model has to use other words.
    from llama_cpp import Llama

    spec = parse_llm_spec("local")
    model = Llama(model_path=spec.model, n_ctx=2048, seed=0, verbose=False)
    settings = build(GenerationSettings, {}, local=True)
    bias = ExampleWordBias(model.tokenize)
    replies = {}
    for biased in (False, True):
        replies[biased] = []
        for attempt in (1, 2, 3):
            messages = build_messages(HARD_CHUNK, DEFAULT_CONTEXT, "question", attempt - 1,
                                      settings.prompt_excerpt_chars)
            kwargs = generation_kwargs(spec, settings, GenerationTuning(), response_format_for(spec), attempt,
                                       bias(messages[-1]["content"]) if biased else None)
            extra = kwargs["extra_generation_kwargs"]
            reply = model.create_chat_completion(messages=messages, max_tokens=kwargs["max_new_tokens"],
                                                 temperature=kwargs["temperature"], **extra)
            replies[biased].append(json.loads(reply["choices"][0]["message"]["content"]))
    copied = [any(copies_example(pair[key]) for key in ("positive", "negative")) for pair in replies[False]]
    assert any(copied), f"precondition: the model no longer copies an example here: {replies[False]}"
    assert not any(copies_example(pair[key]) for pair in replies[True] for key in ("positive", "negative")), \
        replies[True]



def test_the_task_sends_each_llama_cpp_request_its_bias_and_keys_the_cache_with_it(tmp_path, monkeypatch):
    # The real task and model in this process; a spy records what each request carried and passes it on unchanged.
    from distilabel.models.llms import LlamaCppLLM
    from distilabel.pipeline import Pipeline

    from components.generate_queries.task import make_task

    sent = []
    generate = LlamaCppLLM.generate_outputs

    def spy(self, **kwargs):
        sent.append(kwargs)
        return generate(self, **kwargs)

    monkeypatch.setattr(LlamaCppLLM, "generate_outputs", spy)
    spec = parse_llm_spec("local")
    settings = build(GenerationSettings, {"llm_cache_uri": str(tmp_path / "cache")}, local=True)
    with Pipeline(name="steering-test", cache_dir=tmp_path / "distilabel"):
        task = make_task(spec, settings)
    task.load()
    row = next(task.process([{**HARD_CHUNK, "chunk_id": "hard"}]))[0]
    assert sent and row["generation_status"] in ("generated", "failed")
    dump = task.llm._model.tokenize(b" dump", add_bos=False, special=False)  # noqa: SLF001
    for request in sent:
        bias = request["extra_generation_kwargs"]["logit_bias"]
        assert bias == ExampleWordBias(task.llm._model.tokenize)(request["inputs"][0][-1]["content"])  # noqa: SLF001
        assert len(dump) > 1 or str(dump[0]) in bias
    # The bias is part of the key: entries written without it are never served for a biased request.
    messages = task.format_input({**HARD_CHUNK})
    assert task.cache_key(messages) != row_cache_key(task._identity, messages,  # noqa: SLF001
                                                     task._generation_kwargs("question"))  # noqa: SLF001
