"""Chat task: assistant-only labels from a chat template, ShareGPT and OpenAI rows, MT-Bench questions, FastChat's
judge prompts and score parsing, judges (a local OpenAI-compatible server, a tiny local LM) and the scores logged by
fit, validate, test and the `lorafa` command, on a tiny LLaMA and hand-made rows (tests/data)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import byte_level_tokenizer, quiet_trainer, tiny_causal_llama

from lightning_lorafa import LoraFA
from lightning_lorafa.tasks.chat import ChatDataModule, ChatTuner, to_messages
from lightning_lorafa.tasks.cli import main
from lightning_lorafa.tasks.mt_bench import (
    JUDGE_PROMPTS_FILE,
    MTBenchJudge,
    MTBenchQuestion,
    OpenAIJudge,
    TransformersJudge,
    judge_answers,
    judge_prompt,
    load_judge_prompts,
    parse_score,
    read_questions,
)

DATA = Path(__file__).parents[1] / "data"
SHAREGPT = str(DATA / "chat_sharegpt.json")
MESSAGES = str(DATA / "chat_messages.json")
QUESTIONS = str(DATA / "mt_bench_questions.jsonl")
QUESTIONS_H4 = str(DATA / "mt_bench_h4.jsonl")
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% else %}<|assistant|>{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KEY_ENV = "LORAFA_TEST_JUDGE_KEY"
#: The local judge's verdicts per question (found by its first turn's text) and turn, one of them without a rating.
VERDICTS = {
    "Write a two-line postcard": ("Vivid and short. Rating: [[8]]", "Rating: [[6]]"),
    "Pretend to be a ship captain": ("Rating: [[9]]", "Mostly in character. Rating: [5]"),
    "What is 12 times 7?": ("Correct. Rating: [[3.5]]", "Rating: [[2]]"),
    "Ann is taller than Bob": ("I cannot grade this answer.", "Rating: [[7]]"),
}
#: The means those verdicts give: 7 ratings, the unparsed one left out.
EXPECTED = {
    "score": (8 + 6 + 9 + 5 + 3.5 + 2 + 7) / 7,
    "turn1": (8 + 9 + 3.5) / 3,
    "turn2": (6 + 5 + 2 + 7) / 4,
    "writing": 7.0,
    "roleplay": 7.0,
    "math": 2.75,
    "reasoning": 7.0,
    "unparsed": 1.0,
    "questions": 4.0,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model's matrices gain nothing from more, and on a busy 2-core machine two
    threads wait on each other for ~1000x the time of a small matmul; the count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny LLaMA and a byte-level BPE tokenizer with `TEMPLATE` as its chat template (`chat`) and without a chat
    template (`plain`), saved with save_pretrained."""
    texts = [m["value"] for row in json.loads(Path(SHAREGPT).read_text()) for m in row["conversations"]]
    texts += [turn for q in read_questions(QUESTIONS) for turn in q.turns]
    texts += [p.prompt_template for p in load_judge_prompts().values()]
    tokenizer = byte_level_tokenizer(texts, vocab_size=600, extra_special_tokens=tuple(SPECIAL[3:]))
    root = tmp_path_factory.mktemp("chat")
    model = tiny_causal_llama(len(tokenizer), max_position_embeddings=2048)
    for name, template in (("plain", None), ("chat", TEMPLATE)):
        tokenizer.chat_template = template
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"chat": str(root / "chat"), "plain": str(root / "plain")}


class JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible `POST /v1/chat/completions`: answers with the verdict `VERDICTS` holds for the graded
    question and turn (turn 2 when the prompt shows the conversation) and keeps every request body."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, **request})
        user = request["messages"][1]["content"]
        turn = 2 if "### User:" in user else 1
        verdict = next(v for start, v in VERDICTS.items() if start in user)[turn - 1]
        body = json.dumps(
            {
                "id": f"judgment-{len(self.server.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": request["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    """The local judge endpoint (its URL in `.url`, the requests it got in `.requests`), with a key in `KEY_ENV`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv(KEY_ENV, "test-key")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def label_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of labels other than -100."""
    spans, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_labels_are_the_assistant_turns_and_their_end_of_turn_token(checkpoints: dict[str, str]) -> None:
    data = ChatDataModule(checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS)
    data.setup("fit")
    tokenizer, train = data.tokenizer, data.datasets["train"]
    rows = json.loads(Path(SHAREGPT).read_text())
    assert len(train) == len(rows) == 6
    for row, encoded in zip(rows, train, strict=True):
        messages = to_messages(row["conversations"], "conversations")
        ids, labels = encoded["input_ids"], encoded["labels"]
        assert ids == tokenizer.apply_chat_template(messages, return_dict=False)
        replies = [m["content"] + "</s>" for m in messages if m["role"] == "assistant"]
        spans = label_spans(labels)
        assert [tokenizer.decode(labels[a:b]) for a, b in spans] == replies
        assert all(labels[a:b] == ids[a:b] for a, b in spans)
        assert all(ids[a - 1] == tokenizer.convert_tokens_to_ids("<|assistant|>") for a, _ in spans)


def test_openai_messages_rows_encode_like_sharegpt_rows(checkpoints: dict[str, str]) -> None:
    sharegpt = ChatDataModule(checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS)
    messages = ChatDataModule(checkpoints["chat"], data_files={"train": MESSAGES}, mt_bench_file=QUESTIONS)
    sharegpt.setup("fit")
    messages.setup("fit")
    assert sharegpt.datasets["train"].to_list() == messages.datasets["train"].to_list()


def test_max_length_cuts_rows_and_drops_those_left_without_an_answer(checkpoints: dict[str, str]) -> None:
    full = ChatDataModule(checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS)
    full.setup("fit")
    rows = full.datasets["train"].to_list()
    starts = sorted(label_spans(row["labels"])[0][0] for row in rows)
    max_length = starts[2] + 1  # the 3 rows with the shortest first prompt keep at least one answer token
    cut = ChatDataModule(
        checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS, max_length=max_length
    )
    cut.setup("fit")
    kept = [row for row in rows if label_spans(row["labels"])[0][0] < max_length]
    assert 3 <= len(kept) < 6
    assert cut.datasets["train"]["input_ids"] == [row["input_ids"][:max_length] for row in kept]
    assert cut.datasets["train"]["labels"] == [row["labels"][:max_length] for row in kept]
    packed = ChatDataModule(checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS, packing=True)
    packed.setup("fit")
    packs = packed.datasets["train"]
    assert len(packs) < 6 and sum(packs["num_rows"]) == 6
    count = sum(y != -100 for row in rows for y in row["labels"])
    assert sum(y != -100 for row in packs["labels"] for y in row) == count


def test_bad_data_and_a_missing_chat_template_are_named(checkpoints: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"/plain' has no chat template \(tokenizer.chat_template is None\).*set the data module's chat_template",
    ):
        ChatDataModule(checkpoints["plain"], data_files={"train": SHAREGPT})
    given = ChatDataModule(checkpoints["plain"], data_files={"train": SHAREGPT}, chat_template=TEMPLATE)
    assert given.tokenizer.chat_template == TEMPLATE
    wrong = ChatDataModule(checkpoints["chat"], data_files={"train": str(DATA / "metamathqa_sample.json")})
    with pytest.raises(
        ValueError,
        match=r"no conversation column \(columns: \['query', 'response', 'type', 'original_question'\]\); give a "
        r"'conversations' column .* or a 'messages' column",
    ):
        wrong.setup("fit")
    bot = tmp_path / "bot.json"
    bot.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hi"}]}]))
    with pytest.raises(ValueError, match=r"training row 0: 'conversations' message role from='bot' is unknown"):
        ChatDataModule(checkpoints["chat"], data_files={"train": str(bot)}).setup("fit")
    spaced = TEMPLATE.replace("<|assistant|>", "<|assistant|> ")  # a generation prompt ending in a space
    data = ChatDataModule(checkpoints["chat"], data_files={"train": SHAREGPT}, chat_template=spaced)
    with pytest.raises(
        ValueError,
        match=r"training row 0: the chat template renders messages 0-0 with the generation prompt \(message 1 is an "
        r"assistant turn\) as tokens that are not a prefix of those of messages 0-1 \(token \d+: \['Ġ'\] against",
    ):
        data.setup("fit")


@pytest.mark.parametrize(
    ("judgment", "score"),
    [
        ("The answer is correct. Rating: [[7]]", 7.0),
        ("Rating: [[8.5]]", 8.5),
        ("Rating: [3]", 3.0),  # FastChat's fallback pattern
        ("Rating: [[7]] and later [[2]]", 7.0),  # the first rating
        ("Rating: [4] then [[6]]", 6.0),  # "[[N]]" anywhere before "[N]"
        ("Rating: [[11]]", 11.0),  # FastChat keeps a rating outside 1-10
        ("Rating: [[10.]]", 10.0),
        ("Rating: 7/10", None),
        ("Rating: [[-1]]", None),
        ("Rating: [[seven]]", None),
        ("", None),
    ],
)
def test_scores_are_parsed_as_fastchat_parses_them(judgment: str, score: float | None) -> None:
    assert parse_score(judgment) == score


def test_the_judge_prompts_are_fastchats_and_picked_per_category_and_turn(caplog: pytest.LogCaptureFixture) -> None:
    prompts = load_judge_prompts()
    digest = hashlib.sha256(JUDGE_PROMPTS_FILE.read_bytes()).hexdigest()
    assert digest == "c0ed25a9c5a9cb1092346543d8e16b1b40b37b57f1c30d53ad57a97dfd94d9fc"  # FastChat's lines 5-8
    assert list(prompts) == ["single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"]
    writing, _, maths, reasoning = read_questions(QUESTIONS)
    answers = ["It is 84.", "It is 20."]
    prompt, user = judge_prompt(maths, answers, 1, prompts)
    assert (prompt.name, prompt.system_prompt) == ("single-math-v1", "You are a helpful assistant.")
    assert user == (
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
        "assistant to the user question displayed below. Your evaluation should consider correctness and "
        "helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by "
        "comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
        "objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 "
        'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
        "[Question]\nWhat is 12 times 7?\n\n"
        "[The Start of Reference Answer]\n12 times 7 is 84.\n[The End of Reference Answer]\n\n"
        "[The Start of Assistant's Answer]\nIt is 84.\n[The End of Assistant's Answer]"
    )
    prompt, user = judge_prompt(maths, answers, 2, prompts)
    assert prompt.name == "single-math-v1-multi-turn"
    assert prompt.system_prompt.startswith("Please act as an impartial judge and evaluate the quality of the response")
    assert "focus on the assistant's answer to the second question" in prompt.system_prompt
    assert user == (
        "<|The Start of Reference Answer|>\n\n"
        "### User:\nWhat is 12 times 7?\n\n### Reference answer:\n12 times 7 is 84.\n\n"
        "### User:\nNow divide that number by 4.\n\n### Reference answer:\n84 divided by 4 is 21.\n\n"
        "<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n"
        "### User:\nWhat is 12 times 7?\n\n### Assistant A:\nIt is 84.\n\n"
        "### User:\nNow divide that number by 4.\n\n### Assistant A:\nIt is 20.\n\n"
        "<|The End of Assistant A's Conversation with User|>"
    )
    assert [judge_prompt(writing, answers, t, prompts)[0].name for t in (1, 2)] == [
        "single-v1",
        "single-v1-multi-turn",
    ]
    assert judge_prompt(writing, answers, 1, prompts)[1].endswith(
        "[Question]\nWrite a two-line postcard from a rainy seaside town.\n\n"
        "[The Start of Assistant's Answer]\nIt is 84.\n[The End of Assistant's Answer]"
    )

    class FixedJudge(MTBenchJudge):
        def judge(self, system_prompt: str, user_prompt: str) -> str:
            return "Rating: [[5]]"

    with caplog.at_level("WARNING", logger="lightning_lorafa"):
        judgments = judge_answers(FixedJudge(), [writing, maths, reasoning], [answers] * 3)
    assert [(j.question_id, j.turn, j.prompt_name) for j in judgments] == [
        (81, 1, "single-v1"),
        (81, 2, "single-v1-multi-turn"),
        (111, 1, "single-math-v1"),
        (111, 2, "single-math-v1-multi-turn"),
        (121, 1, "single-v1"),  # a reasoning question without a reference: the general prompts, and a warning
        (121, 2, "single-v1-multi-turn"),
    ]
    assert "MT-Bench: questions [121] (categories ['math', 'reasoning', 'coding']) have no reference" in caplog.text


def test_questions_are_read_in_fastchats_and_the_hub_sets_format(tmp_path: Path) -> None:
    questions = read_questions(QUESTIONS)
    assert read_questions(QUESTIONS_H4) == questions
    assert [q.question_id for q in questions] == [81, 91, 111, 121]
    assert questions[2] == MTBenchQuestion(
        111,
        "math",
        ["What is 12 times 7?", "Now divide that number by 4."],
        ["12 times 7 is 84.", "84 divided by 4 is 21."],
    )
    assert questions[0].reference == []
    bad = tmp_path / "bad.jsonl"
    for rows, message in [
        ([{"question_id": 1, "category": "writing", "turns": ["only one"]}], r"question 1 of .* needs 2 turns"),
        ([{"question_id": 1, "category": "math", "turns": ["a", "b"]}] * 2, r"question id 1 appears twice"),
        ([{"id": 1, "text": "a"}], r"columns \['id', 'text'\]; give FastChat's \(question_id, category, turns"),
    ]:
        bad.write_text("\n".join(json.dumps(row) for row in rows))
        with pytest.raises(ValueError, match=message):
            read_questions(bad)
    with pytest.raises(FileNotFoundError, match="question file 'missing.jsonl' does not exist"):
        read_questions("missing.jsonl")


def test_judges_need_their_key_and_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(
        ValueError, match=f"from the environment variable {KEY_ENV}, which is not set; export {KEY_ENV}"
    ):
        OpenAIJudge(api_key_env=KEY_ENV)
    monkeypatch.setitem(sys.modules, "openai", None)
    missing = r"OpenAIJudge needs the openai package.*lightning-lorafa\[mt-bench\]. \(or pip install openai\)"
    with pytest.raises(ModuleNotFoundError, match=missing):
        OpenAIJudge(api_key_env=KEY_ENV)


def test_fit_validate_test_log_the_judges_scores(
    checkpoints: dict[str, str], judge_server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    """Fit with LoRA-FA, then validate and test: the answers of both turns reach the judge (the local server) in
    FastChat's prompts, and its ratings are logged as the overall, per-turn and per-category means."""
    data = ChatDataModule(
        checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS, batch_size=3, eval_batch_size=3
    )
    judge = OpenAIJudge("judge-model", base_url=judge_server.url, api_key_env=KEY_ENV, max_tokens=64)
    pl.seed_everything(0, verbose=False)
    module = ChatTuner(
        checkpoints["chat"], learning_rate=1e-2, max_new_tokens=6, judge=judge, output_dir=str(tmp_path / "answers")
    )
    trainer = quiet_trainer(
        tmp_path,
        accelerator="cpu",
        max_steps=4,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=1,
        callbacks=[LoraFA(r=8, alpha=16)],
    )
    trainer.fit(module, data)  # 2 batches an epoch: one validation after step 4, none in the sanity check
    assert len(judge_server.requests) == 8
    expected = {f"val/mt_bench/{key}": value for key, value in EXPECTED.items()}
    assert {k: v.item() for k, v in trainer.callback_metrics.items() if "mt_bench" in k} == pytest.approx(expected)
    (validated,) = trainer.validate(module, data, verbose=False)
    (tested,) = trainer.test(module, data, verbose=False)
    assert validated == pytest.approx(expected)
    assert tested == pytest.approx({f"test/mt_bench/{key}": value for key, value in EXPECTED.items()})
    assert len(judge_server.requests) == 3 * 8

    (written,) = (tmp_path / "answers").glob("test_*.jsonl")
    assert written.name == "test_mt_bench_step4.jsonl"
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [81, 91, 111, 121]
    assert [[j["score"] for j in line["judgments"]] for line in lines] == [[8, 6], [9, 5], [3.5, 2], [None, 7]]
    prompts = load_judge_prompts()
    questions = read_questions(QUESTIONS)
    sent = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in judge_server.requests[-8:]]
    for i, (question, line) in enumerate(zip(questions, lines, strict=True)):
        assert all(isinstance(a, str) for a in line["answers"]) and len(line["answers"]) == 2
        for turn in (1, 2):
            prompt, user = judge_prompt(question, line["answers"], turn, prompts)
            assert sent[2 * i + turn - 1] == (prompt.system_prompt, user)
    request = judge_server.requests[-1]
    assert (request["path"], request["model"], request["temperature"], request["max_tokens"]) == (
        "/v1/chat/completions",
        "judge-model",
        0.0,
        64,
    )
    # turn 2 is asked with turn 1 and the model's own first answer as history; batched answers are each row's own
    module.eval()
    history = [
        {"role": "user", "content": questions[0].turns[0]},
        {"role": "assistant", "content": lines[0]["answers"][0]},
        {"role": "user", "content": questions[0].turns[1]},
    ]
    assert module.generate([history]) == [lines[0]["answers"][1]]
    conversations = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    assert module.generate(conversations) == [line["answers"][0] for line in lines]
    assert [module.generate([c])[0] for c in conversations] == [line["answers"][0] for line in lines]


def test_a_local_judge_without_ratings_is_counted_as_unparsed(checkpoints: dict[str, str], tmp_path: Path) -> None:
    """The tiny LLaMA as a `TransformersJudge`: its verdicts hold no rating, so every turn is unparsed and the means,
    over no rating, are NaN."""
    with pytest.raises(ValueError, match=r"judge '.*plain' has no chat template"):
        TransformersJudge(checkpoints["plain"]).judge("system", "user")
    data = ChatDataModule(checkpoints["chat"], data_files={"train": SHAREGPT}, mt_bench_file=QUESTIONS)
    judge = TransformersJudge(checkpoints["chat"], max_new_tokens=8, device="cpu")
    module = ChatTuner(checkpoints["chat"], max_new_tokens=4, judge=judge)
    (metrics,) = quiet_trainer(tmp_path, accelerator="cpu").validate(module, data, verbose=False)
    assert (metrics["val/mt_bench/unparsed"], metrics["val/mt_bench/questions"]) == (8, 4)
    assert set(metrics) == {f"val/mt_bench/{key}" for key in EXPECTED}
    assert all(math.isnan(metrics[f"val/mt_bench/{key}"]) for key in EXPECTED if key not in ("unparsed", "questions"))
    verdict = judge.judge("You are a helpful assistant.", "Rate this answer.")
    assert verdict.strip() and parse_score(verdict) is None  # text, without a rating


def test_without_a_judge_the_answers_are_written_but_not_graded(
    checkpoints: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = ChatDataModule(checkpoints["chat"], mt_bench_file=QUESTIONS, max_questions=2)
    module = ChatTuner(checkpoints["chat"], max_new_tokens=3, output_dir=str(tmp_path / "answers"))
    with caplog.at_level("WARNING", logger="lightning_lorafa"):
        (metrics,) = quiet_trainer(tmp_path, accelerator="cpu").validate(module, data, verbose=False)
    assert metrics == {"val/mt_bench/questions": 2.0}
    assert "MT-Bench: ChatTuner has no judge, so the val answers are not graded." in caplog.text
    written = (tmp_path / "answers" / "val_mt_bench_step0.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in written]
    assert [line["question_id"] for line in lines] == [81, 91]
    assert all(line["judgments"] == [None, None] and len(line["answers"]) == 2 for line in lines)


def write_config(checkpoints: dict[str, str], judge_url: str, tmp_path: Path) -> Path:
    """A `lorafa` YAML config: 2 LoRA-FA steps on the ShareGPT rows, the local judge, `TEMPLATE` set on the data
    module (the model's checkpoint has no chat template), a checkpoint under `tmp_path/checkpoints`."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning_lorafa.LoraFA", "init_args": {"r": 4, "alpha": 8}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True},
                },
            ],
        },
        "model": {
            "class_path": "lightning_lorafa.tasks.chat.ChatTuner",
            "init_args": {
                "model_name_or_path": checkpoints["plain"],
                "learning_rate": 1e-2,
                "max_new_tokens": 4,
                "output_dir": str(tmp_path / "answers"),
                "judge": {
                    "class_path": "lightning_lorafa.tasks.mt_bench.OpenAIJudge",
                    "init_args": {"model": "judge-model", "base_url": judge_url, "api_key_env": KEY_ENV},
                },
            },
        },
        "data": {
            "class_path": "lightning_lorafa.tasks.chat.ChatDataModule",
            "init_args": {
                "data_files": {"train": SHAREGPT},
                "mt_bench_file": QUESTIONS,
                "chat_template": TEMPLATE,
                "batch_size": 3,
                "eval_batch_size": 4,
            },
        },
    }
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lorafa_fit_and_test_commands_pick_the_judge_from_yaml(
    checkpoints: dict[str, str], judge_server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    path = write_config(checkpoints, judge_server.url, tmp_path)
    fit = main(["fit", "--config", str(path)])
    assert fit.trainer.global_step == 2 and isinstance(fit.model.judge, OpenAIJudge)
    assert fit.model.judge.base_url == judge_server.url and fit.model.tokenizer.chat_template == TEMPLATE
    assert fit.trainer.callback_metrics["val/mt_bench/score"].item() == pytest.approx(EXPECTED["score"])
    assert "judge" not in fit.model.hparams
    test = main(["test", "--config", str(path), "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    metrics = {k: v.item() for k, v in test.trainer.callback_metrics.items()}
    assert metrics == pytest.approx({f"test/mt_bench/{key}": value for key, value in EXPECTED.items()})
    assert len(judge_server.requests) == 2 * 8


def test_two_ddp_processes_answer_each_question_once_and_rank_0_judges(
    checkpoints: dict[str, str], judge_server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    """`lorafa validate` on 2 CPU processes (gloo), one question a batch, 3 questions: the distributed sampler gives
    rank 1 a copy of question 81 to even out the shares; the gathered answers hold each question once, only rank 0
    calls the judge, and both ranks log the same scores."""
    path = write_config(checkpoints, judge_server.url, tmp_path)
    command = [
        str(Path(sys.executable).parent / "lorafa"), "validate", "--config", str(path),
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--data.init_args.max_questions", "3", "--data.init_args.eval_batch_size", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    lines = [json.loads(line) for line in (tmp_path / "answers" / "val_mt_bench_step0.jsonl").read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [81, 91, 111]
    users = [request["messages"][1]["content"] for request in judge_server.requests]
    assert len(users) == 6 and sum("Write a two-line postcard" in user for user in users) == 2
    score = (8 + 6 + 9 + 5 + 3.5 + 2) / 6
    printed = re.search(r"val/mt_bench/score\s*[│|]?\s*([\d.]+)", output)
    assert printed is not None and float(printed.group(1)) == pytest.approx(score), output[-3000:]
