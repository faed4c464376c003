"""Language-tagged sources: prepared apart by language with their
statistics, blended by a mixture plan, and refused in one line when
their languages are wrong."""
import json
import math
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from coom.cli import main
from coom.config import DataConfig
from coom.config.data import MixtureChange
from coom.data import identify as identify_module
from coom.data import locale_sample
from coom.data.loader import build_samples
from coom.data.prepare import (
    GETTEXT_DOCUMENTS,
    TextSource,
    _balanced,
    prepare,
)
from coom.train.metrics import read_metrics
from tests.data.test_locale_sample import write_catalog

SENTENCES = {
    "en": "the quick brown fox jumps over the lazy dog near the river",
    "de": "der schnelle braune Fuchs springt über den faulen Hund am Fluss",
    "ja": "素早い茶色の狐が川のそばでのろまな犬を飛び越える",
    "sw": "mbweha mwepesi wa kahawia anaruka juu ya mbwa mvivu karibu na mto",
}
DOCUMENTS = {"en": 1200, "de": 400, "ja": 200, "sw": 120}


def _corpus(folder) -> str:
    """A .jsonl of numbered sentences in four languages, the language in
    each record's 'lang' field."""
    path = folder / "mixed.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        for language, count in DOCUMENTS.items():
            for number in range(count):
                text = f"{SENTENCES[language]} {number}"
                file.write(json.dumps({"text": text, "lang": language},
                                      ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfig:
    folder = tmp_path_factory.mktemp("multilingual")
    return DataConfig(paths=[_corpus(folder)], languages=["field:lang"],
                      cache_dir=str(folder / "cache"),
                      tokenizer_vocab_size=400, seq_length=32,
                      split="80,20,0", mixture="temperature")


def test_a_language_field_prepares_each_language_apart(config):
    prepared = prepare(config)
    assert sorted(prepared.languages) == sorted(DOCUMENTS)
    assert len(prepared.prefixes) == len(DOCUMENTS)
    for language, count in DOCUMENTS.items():
        figures = prepared.statistics[language]
        assert figures.documents == count
        text = "".join(f"{SENTENCES[language]} {n}" for n in range(count))
        assert figures.bytes == len(text.encode("utf-8"))
        assert figures.tokens > count
    # Japanese has no spaces between words to count fertility by.
    assert prepared.statistics["ja"].tokens_per_word("ja") is None
    assert prepared.statistics["en"].tokens_per_word("en") > 0


def test_the_blend_follows_the_plan_within_one_percent(config):
    prepared = prepare(config)
    train, _ = build_samples(prepared, config, seed=3, micro_batch_size=2,
                             train_samples=2000, valid_samples=8)
    [phase] = train.plan
    plan = phase.shares
    assert set(plan) == set(DOCUMENTS)
    assert sum(share.share for share in plan.values()) == pytest.approx(1)
    # Temperature 0.3 lifts the rare languages above their data's share.
    tokens = sum(share.tokens for share in plan.values())
    assert plan["sw"].share > plan["sw"].tokens / tokens
    drawn = Counter(np.asarray(train.dataset.dataset_index).tolist())
    for index, language in enumerate(prepared.languages):
        realised = drawn[index] / len(train.dataset)
        assert realised == pytest.approx(plan[language].share, abs=0.01)


def test_languages_named_in_the_config_tag_whole_sources(config, tmp_path):
    """One folder of English and one of Brazilian Portuguese text files,
    tagged by the config (the region dropped): a dataset each."""
    sources = []
    for name, text in (("english", SENTENCES["en"]),
                       ("portuguese", "a rápida raposa marrom salta")):
        folder = tmp_path / name
        folder.mkdir()
        for number in range(30):
            (folder / f"{number}.txt").write_text(f"{text} {number}")
        sources.append(str(folder))
    tagged = replace(config, paths=sources, languages=["en", "pt_BR"],
                     cache_dir=str(tmp_path / "cache"))
    prepared = prepare(tagged)
    assert prepared.languages == ["en", "pt"]
    assert prepared.statistics["pt"].documents == 30
    assert prepared.statistics["en"].bytes == sum(
        len(f"{SENTENCES['en']} {n}") for n in range(30))


def test_identified_languages_split_a_source_by_language(
        config, tmp_path, monkeypatch):
    """The same sentences with no language field: identified among the
    four languages, each document lands with its own language, and the
    labels are cached: preparing again needs no identifier."""
    path = tmp_path / "untagged.jsonl"
    records = [json.loads(line) for line in
               open(config.paths[0], encoding="utf-8")]
    path.write_text("".join(json.dumps({"text": record["text"]}) + "\n"
                            for record in records))
    identify = replace(config, paths=[str(path)],
                       languages=["identify:en+de+ja+sw"],
                       cache_dir=str(tmp_path / "cache"))
    prepared = prepare(identify)
    assert sorted(prepared.languages) == sorted(DOCUMENTS)
    for language, count in DOCUMENTS.items():
        assert prepared.statistics[language].documents == count
    [labels] = (tmp_path / "cache" / "languages").glob("untagged-*.txt")
    assert Counter(labels.read_text().split()) == DOCUMENTS
    identify_module._identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "py3langid", None)
    assert prepare(identify).statistics == prepared.statistics


@pytest.mark.parametrize("languages, message", [
    ("[identify:en+xx]", "unknown language code 'xx'"),
    ("[identify:en+tlh]", "the identifier does not know tlh; it knows"),
])
def test_bad_identification_is_refused_in_one_line(tmp_path, capsys,
                                                   languages, message):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "hello there, world"}) + "\n")
    assert _prepare(tmp_path, f"data.paths=[{path}]",
                    f"data.languages={languages}") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("coom: error: ") and message in error


def test_identification_without_its_library_says_how_to_install_it(
        tmp_path, capsys, monkeypatch):
    identify_module._identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "py3langid", None)
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "hello there, world"}) + "\n")
    assert _prepare(tmp_path, f"data.paths=[{path}]",
                    "data.languages=[identify]") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pip install 'py3langid>=0.4'" in error


def test_a_schedule_follows_each_plan_and_goes_on_through_the_data(
        config):
    """Proportional for 100 steps of 10 samples, then uniform: each
    phase's blend follows its plan within 1%, and each language's
    samples continue where the first phase left them, none drawn
    twice."""
    schedule = replace(config, mixture="proportional", mixture_schedule=[
        MixtureChange(step=100, mixture="temperature", mixture_alpha=0.0)])
    prepared = prepare(schedule)
    train, _ = build_samples(prepared, schedule, seed=3, micro_batch_size=2,
                             train_samples=3000, valid_samples=8,
                             global_batch_size=10)
    assert [(p.step, p.steps) for p in train.plan] == [(0, 100), (100, 200)]
    datasets = np.asarray(train.dataset.dataset_index)
    samples = np.asarray(train.dataset.dataset_sample_index)
    for phase, part in zip(train.plan, (slice(0, 1000), slice(1000, None))):
        drawn = Counter(datasets[part].tolist())
        for index, language in enumerate(prepared.languages):
            assert drawn[index] / len(datasets[part]) == pytest.approx(
                phase.shares[language].share, abs=0.01)
    assert train.plan[1].shares["sw"].share == pytest.approx(0.25)
    for index in range(len(prepared.languages)):
        ours = samples[datasets == index]
        assert sorted(ours) == list(range(len(ours)))


def _multilingual_run(config, *overrides) -> list[str]:
    return ["--set", f"data.paths=[{config.paths[0]}]",
            "data.languages=[field:lang]",
            f"data.cache_dir={config.cache_dir}",
            "data.tokenizer_vocab_size=400", "data.seq_length=32",
            "data.split=80,20,0", "model.num_layers=2",
            "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_iters=1", "logging.progress_bar=false",
            "logging.log_interval=1", *overrides]


def test_a_run_resumes_exactly_across_a_mixture_change(config, tmp_path):
    """Six steps with the mixture changed after the third, straight and
    in pieces that stop before and after the change: the same losses
    and gradient norms, bit for bit."""
    change = ("data.mixture_schedule=[{step: 3, mixture: temperature, "
              "mixture_alpha: 0}]")
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert main(["train", "tiny", "--run-dir", str(straight),
                 *_multilingual_run(config, change, "train.steps=6")]) == 0
    assert main(["train", "tiny", "--run-dir", str(pieces),
                 *_multilingual_run(config, change, "train.steps=6",
                                    "train.exit_interval=2")]) == 0
    for exit_interval in ("4", "null"):
        assert main(["train", "--resume", str(pieces), "--set",
                     f"train.exit_interval={exit_interval}"]) == 0
    plan = json.loads((pieces / "mixture.json").read_text())["phases"]
    assert [(p["step"], p["plan"]) for p in plan] == [
        (0, "proportional"), (3, "temperature")]
    expected, resumed = read_metrics(straight), read_metrics(pieces)
    assert [r["step"] for r in resumed] == list(range(7))
    for ours, theirs in zip(resumed, expected, strict=True):
        for key in ("step", "loss", "grad_norm", "val_loss",
                    "consumed_samples"):
            assert ours.get(key) == theirs.get(key), (key, ours["step"])


@pytest.mark.parametrize("overrides, message", [
    (["data.languages=null", "train.steps=6"],
     "name the sources' languages in data.languages"),
    (["train.steps=3"], "a mixture change at step 3 must come before"),
    (["data.mixture_schedule=[{step: 3}, {step: 2}]", "train.steps=6"],
     "steps must increase"),
])
def test_bad_mixture_schedules_are_refused_in_one_line(
        config, tmp_path, capsys, overrides, message):
    run = _multilingual_run(config, "data.mixture_schedule=[{step: 3}]",
                            *overrides)
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "run"),
                 *run]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("coom: error: ") and message in error


def _prepare(tmp_path, *overrides) -> int:
    return main(["data", "prepare", "tiny", "--set",
                 f"data.cache_dir={tmp_path / 'cache'}",
                 "data.tokenizer_vocab_size=300", *overrides])


@pytest.mark.parametrize("records, languages, message", [
    ([{"text": "hello there, world", "lang": "en"}], "[xx]",
     "unknown language code 'xx'"),
    ([{"text": "hello there, world", "lang": "klingon"}], "[field:lang]",
     "mixed.jsonl:1: unknown language code 'klingon'"),
    ([{"text": "hello there, world"}], "[field:lang]",
     "mixed.jsonl:1 has no string field 'lang'"),
    ([{"text": "hello there, world", "lang": "en"}], "['field:']",
     "needs the field's name"),
])
def test_bad_languages_are_refused_in_one_line(tmp_path, capsys, records,
                                               languages, message):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _prepare(tmp_path, f"data.paths=[{path}]",
                    f"data.languages={languages}") == 2
    # Above the error, at most the progress bar that stopped.
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("coom: error: ") and message in error


def test_a_language_field_needs_jsonl_records(tmp_path, capsys):
    path = tmp_path / "plain.txt"
    path.write_text("just some text in a text file\n")
    assert _prepare(tmp_path, f"data.paths=[{path}]",
                    "data.languages=[field:lang]") == 2
    assert "needs .jsonl records" in capsys.readouterr().err


def test_a_plan_beyond_max_epochs_is_refused_in_one_line(config, tmp_path,
                                                         capsys):
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.paths=[{config.paths[0]}]",
                 "data.languages=[field:lang]",
                 f"data.cache_dir={config.cache_dir}",
                 "data.tokenizer_vocab_size=400", "data.seq_length=32",
                 "data.split=80,20,0", "data.mixture=unimax",
                 "data.max_epochs=1", "train.steps=300"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.max_epochs: the unimax plan repeats" in error


def test_the_multilingual_recipe_trains_on_translated_messages(
        tmp_path, monkeypatch):
    """tiny-multilingual on three languages' catalogs (English from
    their msgids): the plan, written to the run, covers every language
    with enough text, none repeated beyond max_epochs."""
    root = tmp_path / "locale"
    for language, word in (("de", "Nachricht"), ("fr", "message"),
                           ("sv", "meddelande")):
        write_catalog(root, language, "tool", {
            f"Message number {n} of the tool": f"{word} {n} {SENTENCES['en']}"
            for n in range(GETTEXT_DOCUMENTS[0])})
    monkeypatch.setattr(locale_sample, "DEFAULT_ROOT", root)
    run = tmp_path / "run"
    assert main(["train", "tiny-multilingual", "--run-dir", str(run),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.tokenizer_vocab_size=400", "data.seq_length=32",
                 "model.num_layers=2", "train.steps=2",
                 "train.micro_batch_size=2", "train.global_batch_size=2",
                 "train.eval_iters=1", "logging.progress_bar=false"]) == 0
    [plan] = json.loads((run / "mixture.json").read_text())["phases"]
    assert plan["plan"] == "unimax"
    assert sorted(plan["languages"]) == ["de", "en", "fr", "sv"]
    assert all(language["epochs"] <= 4
               for language in plan["languages"].values())


def _two_languages(tmp_path) -> list[TextSource]:
    """English and, with 100 times fewer bytes, Swahili."""
    english = tmp_path / "en.jsonl"
    swahili = tmp_path / "sw.jsonl"
    for path, language, count in ((english, "en", 1000),
                                  (swahili, "sw", 10)):
        path.write_text("".join(
            json.dumps({"text": f"{language} document {n:05d} " + "x" * 30,
                        "lang": language}) + "\n" for n in range(count)))
    return [TextSource(path.stem, [path], language="field:lang")
            for path in (english, swahili)]


@pytest.mark.parametrize("alpha, floor, share", [
    # (1/100)^0.3 = 0.25 of English's weight: a fifth of the text.
    (0.3, 0.0, 1 / (1 + 100 ** 0.3)),
    # At least 0.6 of an equal share (half the bytes): 0.3 x 1010
    # against English's 1000.
    (1.0, 0.6, 0.3 * 1010 / (0.3 * 1010 + 1000)),
    # The floor over alpha 0.3's fifth changes nothing.
    (0.3, 0.2, 1 / (1 + 100 ** 0.3)),
])
def test_tokenizer_text_is_balanced_by_alpha_and_floor(tmp_path, alpha,
                                                       floor, share):
    """Swahili's share of the tokenizer's text, its documents repeated;
    the total stays the bytes of the sources."""
    sources = _two_languages(tmp_path)
    drawn = list(_balanced(sources, "text", alpha, floor))
    assert drawn == list(_balanced(sources, "text", alpha, floor))
    realised = sum(len(d) for d in drawn if d.startswith("sw")) \
        / sum(len(d) for d in drawn)
    assert realised == pytest.approx(share, abs=0.01)
    assert sum(map(len, drawn)) == pytest.approx(1010 * len(drawn[0]),
                                                 rel=0.02)


def test_validation_is_logged_per_language(config, tmp_path, capsys):
    """Each evaluation logs every language's loss on its own validation
    documents, and its bits per byte from its bytes per token; coom eval
    prints them too."""
    run = tmp_path / "run"
    overrides = ["--set", f"data.paths=[{config.paths[0]}]",
                 "data.languages=[field:lang]",
                 f"data.cache_dir={config.cache_dir}",
                 "data.tokenizer_vocab_size=400", "data.seq_length=32",
                 "data.split=80,20,0", "model.num_layers=2",
                 "train.steps=2", "train.eval_interval=2",
                 "train.eval_iters=1", "train.micro_batch_size=2",
                 "train.global_batch_size=2", "logging.progress_bar=false"]
    assert main(["train", "tiny", "--run-dir", str(run), *overrides]) == 0
    prepared = prepare(replace(config, tokenizer=str(run / "tokenizer.json"),
                               eod_token="<|endoftext|>"))
    records = [r for r in read_metrics(run) if "val_loss" in r]
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        for language in DOCUMENTS:
            loss = record[f"val_loss/{language}"]
            assert math.isfinite(loss) and loss > 0
            per_byte = prepared.statistics[language].tokens_per_byte
            assert record[f"val_bpb/{language}"] == pytest.approx(
                loss * per_byte / math.log(2))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    for language in DOCUMENTS:
        assert f"{language}: loss" in printed
    assert "bits per byte" in printed
