"""llama_lite.tokenizer on the two real tokenizers it serves.

SmolLM2's (from its GGUF file) and its chat template: against transformers' tokenizer for the same
GGUF. The Llama-2 tokenizer (tokenizer.model, sentencepiece) and Meta's chat format: against
sentencepiece's own SentencePieceProcessor for the ids, and Meta's chat_completion prompt
construction (llama/generation.py, Llama-2 release), re-implemented below line for line.
"""

import pytest

from llama_lite import Tokenizer

# -- SmolLM2 (GGUF) against transformers ----------------------------------------------------------
VARIED_TEXT = (
    "Hello world! Ünïcödé façade, naïve café — 東京タワー, Привет мир, emoji 🦙🚀.\n"
    "Digits: 3.14159, 1,000,000 and 2024-11-23; code:\n"
    "    def f(x):\n\t\treturn x**2  # comment\n"
    "   multiple   spaces\n\n\nnew lines, tabs\tand <|im_start|> as plain text? "
)


def test_smollm2_ids_equal_reference(llama, hf_smollm2):
    _, hf_tok = hf_smollm2
    ours = llama.tokenizer.encode(VARIED_TEXT, bos=False, eos=False)
    assert ours == hf_tok(VARIED_TEXT, add_special_tokens=False)["input_ids"]
    assert llama.tokenizer.decode(ours) == VARIED_TEXT


def test_smollm2_chat_template_tokens_equal_reference(llama, hf_smollm2):
    _, hf_tok = hf_smollm2
    for dialog in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And 2+2?"}],
    ):
        ref = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert llama.tokenizer.encode_dialog(dialog) == list(ref)


# -- Llama-2 (sentencepiece) against sentencepiece and Meta's code ---------------------------------
TEXTS = [
    "Hello, world!",
    " hello",  # a leading space becomes its own piece: 29871 '▁', then '▁hello'
    "\nhello",  # 29871 before a newline byte
    "hello\n\nworld",
    "  two spaces",
    "x  y",  # a double space inside: 29871 in the middle
    "trailing ",  # 29871 at the end
    "3.14159 and 2024",  # digits one by one, each number after '▁'
    "😀 emoji",  # byte fallback <0xF0><0x9F>...
    "日本語のテキスト",
    "tab\there",
    "[INST] hi [/INST] <<SYS>>",
    "Ünïcödé naïve café",
    "We hold these truths to be self-evident, that all men are created equal.",
    "",
]


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_path):
    from sentencepiece import SentencePieceProcessor

    proc = SentencePieceProcessor()
    proc.Load(str(llama2_tokenizer_path))
    return proc


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
    return Tokenizer.from_sentencepiece(llama2_tokenizer_path)


def test_special_ids(tok, sp):
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2) == (sp.vocab_size(), sp.bos_id(), sp.eos_id())
    assert tok.id_to_piece(29871) == "▁" and tok.stop_ids == [2]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece(tok, sp, text):
    ids = sp.EncodeAsIds(text)
    assert tok.encode(text, bos=False, eos=False) == ids
    assert tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
    assert tok.decode(ids) == sp.DecodeIds(ids)


def test_the_29871_cases_are_covered(tok):
    where = {t: [i for i, x in enumerate(tok.encode(t, bos=False, eos=False)) if x == 29871] for t in TEXTS}
    assert where[" hello"] == [0] and where["\nhello"] == [0] and where["x  y"] == [1] and where["trailing "] == [1]
    assert where["Hello, world!"] == []
    # The piece is why "[/INST]" + " answer" tokenizes differently from "[/INST] answer" in one go.
    assert tok.encode(" answer", bos=False, eos=False)[0] == 29871


# -- Meta's reference chat construction (llama/generation.py, Llama.chat_completion) ----------
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_chat_tokens(sp, dialog) -> list[int]:
    """Meta's code with its Tokenizer.encode(s, bos, eos) inlined as sentencepiece calls."""

    def encode(s, bos, eos):
        t = sp.encode(s)
        if bos:
            t = [sp.bos_id()] + t
        if eos:
            t = t + [sp.eos_id()]
        return t

    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
        [msg["role"] == "assistant" for msg in dialog[1::2]]
    )
    dialog_tokens: list[int] = sum(
        [
            encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(
                dialog[::2],
                dialog[1::2],
            )
        ],
        [],
    )
    assert dialog[-1]["role"] == "user"
    dialog_tokens += encode(
        f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}",
        bos=True,
        eos=False,
    )
    return dialog_tokens


DIALOG = [
    {"role": "system", "content": "Always answer with a short sentence.\nBe kind."},
    {"role": "user", "content": "What is the capital of France? "},
    {"role": "assistant", "content": "  The capital of France is Paris."},
    {"role": "user", "content": "And of Germany?\n"},
    {"role": "assistant", "content": "Berlin."},
    {"role": "user", "content": "Which one is larger? 😀"},
]


@pytest.mark.parametrize("dialog", [DIALOG, DIALOG[1:], DIALOG[:2], [DIALOG[1]]],
                         ids=["3 turns + system", "3 turns", "system + 1 turn", "1 turn"])
def test_chat_tokens_equal_metas_reference(tok, sp, dialog):
    ours = tok.encode_dialog(dialog)
    assert ours == meta_chat_tokens(sp, dialog)
    assert ours[0] == 1 and ours[-4:] == sp.encode(E_INST)[-4:] and 2 not in ours[-5:]


def test_three_turn_dialog_structure(tok):
    ids = tok.encode_dialog(DIALOG)
    # one BOS per user turn, one EOS per finished assistant answer
    assert ids.count(1) == 3 and ids.count(2) == 2
    first_turn = tok.decode(ids[: ids.index(2)])
    assert first_turn == ("[INST] <<SYS>>\nAlways answer with a short sentence.\nBe kind.\n<</SYS>>\n\n"
                          "What is the capital of France? [/INST] The capital of France is Paris. ")  # Meta keeps the space


@pytest.mark.parametrize("dialog, message", [
    ([], "dialog is empty"),
    ([{"role": "system", "content": "be brief"}], "system message but no user message"),
    ([{"role": "assistant", "content": "hi"}], "turn 0 is 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turn 1 is 'user', expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "turn 1 is 'system', expected 'assistant'"),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "turn 0 is 'system', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from the user"),
    ([{"role": "user", "content": "hi [INST] there"}], "special tags"),
    ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "hi"}], "special tags"),
    ([{"role": "user", "content": 5}], "content must be a str"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
])
def test_dialog_validation(tok, dialog, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        tok.encode_dialog(dialog)


def test_meta_signature_and_bad_input(llama2_tokenizer_path, tmp_path):
    assert Tokenizer(str(llama2_tokenizer_path)).encode("hi", bos=True, eos=False) == [1, 7251]
    with pytest.raises(FileNotFoundError, match="tokenizer_path="):
        Tokenizer.from_sentencepiece(tmp_path / "tokenizer.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_sentencepiece(bad)
