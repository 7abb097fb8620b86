"""anymal.metrics: VQA accuracy against the official algorithm, the VQAv2 evaluator and its controls, caption metrics."""
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

import anymal.metrics as ev
from anymal.config import DataError
from anymal.metrics import (caption_metrics, evalai_answer, evaluate_captions, evaluate_vqa, spice_available,
                            vqa_accuracy, vqa_score, vqa_score_normalised)

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("vqa_reference", FIX / "vqa_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)  # the REFERENCE transcription of the official algorithm (tests only)


def ten(*pairs):
    "ten(('yes', 9), ('no', 1)) -> the 10 human answers."
    return [a for a, n in pairs for _ in range(n)]


# (prediction, human answers, expected score, what it exercises). Expected values worked out by hand from the
# official vqaEval.py: with k matching annotators (after cleaning) the score is (k*min(1,(k-1)/3) + (n-k)*min(1,k/3))/n,
# i.e. 0, .3, .6, .9, 1 for k = 0..4 when n = 10. Cleaning happens only when the human answers are not all identical.
CASES = [
    ("cat", ten(("dog", 10)), 0.0, "0 matching annotators"),
    ("cat", ten(("cat", 1), ("dog", 9)), 0.3, "1 matching"),
    ("cat", ten(("cat", 2), ("dog", 8)), 0.6, "2 matching"),
    ("cat", ten(("cat", 3), ("dog", 7)), 0.9, "3 matching"),
    ("cat", ten(("cat", 4), ("dog", 6)), 1.0, "4 matching"),
    ("cat", ten(("cat", 10)), 1.0, "all 10 matching"),
    ("red", ten(("red", 2), ("blue", 4), ("green", 4)), 0.6, "three distinct answers"),
    ("x", ["x", "y", "y"], (0 + 1 / 3 + 1 / 3) / 3, "3 annotators: averaged over 3 leave-one-out sets"),
    # all identical: only newline/tab/strip, no other cleaning on either side
    ("Yes", ten(("yes", 10)), 0.0, "identical answers: case is not folded"),
    ("yes.", ten(("yes", 10)), 0.0, "identical answers: period kept"),
    ("dog", ten(("the dog", 10)), 0.0, "identical answers: articles kept"),
    ("the dog", ten(("the dog", 10)), 1.0, "identical answers: exact match"),
    ("2", ten(("two", 10)), 0.0, "identical answers: number words kept"),
    ("  yes\n", ten(("yes", 10)), 1.0, "whitespace cleaning always applies"),
    ("red\ncar", ten(("red car", 10)), 1.0, "newline becomes a space"),
    ("yes", [" yes"] + ten(("yes", 9)), 1.0, "ground truth stripped before the identical test"),
    ("Yes", [" yes\t"] + ten(("yes", 9)), 0.0, "stripped ground truth identical: no case folding"),
    # mixed: both sides fully cleaned
    ("Yes.", ten(("yes", 9), ("no", 1)), 1.0, "mixed answers: period and case cleaned"),
    ("no", ten(("yes", 9), ("no", 1)), 0.3, "mixed answers: minority answer"),
    ("YES", ten(("Yes", 5), ("yes", 5)), 1.0, "answers differing only by case count as mixed, then fold"),
    # number words
    ("two", ["2", "2", "two"] + ten(("3", 7)), 0.9, "number word in prediction and ground truth"),
    ("2", ["2", "2", "two"] + ten(("3", 7)), 0.9, "digit against a number word"),
    ("none", ["none", "0", "zero"] + ten(("1", 7)), 0.9, "none and zero map to 0"),
    ("Ten", ten(("10", 4), ("11", 6)), 1.0, "ten maps to 10"),
    ("twenty", ten(("20", 4), ("21", 6)), 0.0, "only zero..ten are mapped"),
    # articles
    ("Dog", ["a dog", "the dog", "dog"] + ten(("cat", 7)), 0.9, "articles dropped from ground truth"),
    ("an dog", ["a dog", "the dog", "dog"] + ten(("cat", 7)), 0.9, "articles dropped from prediction"),
    ("the", ten(("the", 4), ("a", 6)), 1.0, "articles alone clean to the empty string"),
    # contractions
    ("dont", ["dont", "don't", "do not"] + ten(("no", 7)), 0.6, "dont -> don't"),
    ("Don't", ["dont", "don't", "do not"] + ten(("no", 7)), 0.6, "apostrophe is not punctuation"),
    ("im", ["im", "i'm"] + ten(("me", 8)), 0.3, "uppercase table key 'Im' never matches"),
    ("cant", ten(("can't", 3), ("can", 7)), 0.9, "cant -> can't"),
    ("its", ten(("its", 8), ("it's", 2)), 1.0, "its is not a contraction key"),
    # punctuation
    ("1,000", ["1000", "1000", "1,000"] + ten(("500", 7)), 0.9, "digit comma deleted"),
    ("1000", ["1000", "1000", "1,000"] + ten(("500", 7)), 0.9, "digit comma deleted in ground truth"),
    ("red,blue", ten(("red blue", 4), ("red", 6)), 1.0, "comma between letters becomes a space"),
    ("red, blue", ten(("red blue", 4), ("red", 6)), 1.0, "comma beside a space is deleted"),
    ("x-ray", ten(("x ray", 3), ("xray", 7)), 0.9, "hyphen inside a word becomes a space"),
    ("x-ray -", ten(("x ray", 3), ("xray", 7)), 1.0, "a hyphen beside a space deletes every hyphen"),
    ("1,000-2,000", ten(("10002000", 3), ("1000 2000", 7)), 0.9, "a digit comma deletes every mark"),
    ("1000-2000", ten(("10002000", 3), ("1000 2000", 7)), 1.0, "without it the hyphen becomes a space"),
    ("what?", ten(("what", 4), ("who", 6)), 1.0, "question mark"),
    ("(yes)", ten(("yes", 3), ("no", 7)), 0.9, "brackets"),
    # the period rule
    ("3.5", ten(("3.5", 3), ("35", 7)), 0.9, "period before a digit kept"),
    ("35", ten(("3.5", 3), ("35", 7)), 1.0, "3.5 is not 35"),
    ("end.", ["end", "end", "end."] + ten(("start", 7)), 0.9, "trailing period deleted"),
    ("a.m.", ten(("am", 4), ("pm", 6)), 1.0, "periods between letters deleted"),
    ("3.", ten(("3", 4), ("4", 6)), 1.0, "period after a digit deleted"),
    (".5", ten((".5", 4), ("5", 6)), 1.0, "leading period before a digit kept"),
    ("0.5", ten((".5", 4), ("5", 6)), 0.0, "no numeric equivalence"),
    ("two\tdogs\n", ten(("2 dogs", 3), ("dogs", 7)), 0.9, "tab, newline, then number words"),
]


@pytest.mark.parametrize("pred,answers,expected,why", CASES, ids=[c[3] for c in CASES])
def test_vqa_score_cases(pred, answers, expected, why):
    assert vqa_score(pred, answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_score(pred, answers) == ref.score(pred, answers)  # and bit-identical to the reference


VOCAB = ["yes", "Yes", "no", "2", "two", "Two", "none", "0", "zero", "ten", "10", "the dog", "a dog", "dog", "Dog.",
         "dont", "don't", "do not", "1,000", "1000", "3.5", "35", "end.", "end", "x-ray", "x ray", "xray", "x-ray -",
         "yes / no", "yes no", "red,blue", "red blue", "  red\n", "red\tcar", "red car", "it's", "its", "Im", "im",
         "a", "the", "", "(a)", "a.m.", "am", "1,000-2,000", "10002000", "what?", "what", "Wouldnt", "wouldn't",
         "@home", "home", "\"quoted\"", "quoted", "5!", "5", "{x}", "x", "a\\b", "a b", "...", "one two three", "1 2 3"]


def test_vqa_score_matches_reference_on_random_cases():
    rng = random.Random(0)
    n_identical = 0
    for _ in range(3000):
        pool = rng.sample(VOCAB, rng.choice([1, 1, 2, 3, 4]))
        answers = [rng.choice(pool) for _ in range(rng.choice([10, 10, 10, 3, 5]))]
        n_identical += len(set(answers)) == 1
        pred = rng.choice(pool + VOCAB[:10] if rng.random() < 0.7 else VOCAB)
        assert vqa_score(pred, answers) == ref.score(pred, answers), (pred, answers)
    assert n_identical > 300  # both branches are well exercised


# ---- the same metric after EvalAI's answer processor (LLaVA, lmms-eval) ----------------------------------------------

# (prediction, human answers, official score on the raw prediction, score after EvalAI's processor, what it shows)
NORMALISED_CASES = [
    ("Yes.", ten(("yes", 10)), 0.0, 1.0, "unanimous humans: the raw period costs the whole point"),
    ("two", ten(("2", 10)), 0.0, 1.0, "number word against a unanimous digit"),
    ("The dog", ten(("dog", 10)), 0.0, 1.0, "article and capital against a unanimous answer"),
    ("Two dogs.", ten(("2 dogs", 10)), 0.0, 1.0, "all three at once"),
    ("YES", ten(("yes", 10)), 0.0, 1.0, "case alone"),
    ("What?", ten(("what", 10)), 0.0, 1.0, "question mark deleted"),
    ("2 ", ten(("2", 10)), 1.0, 1.0, "surrounding whitespace: stripped by both"),
    ("yes", ten(("yes", 10)), 1.0, 1.0, "already clean: the same"),
    ("Yes.", ten(("yes", 9), ("no", 1)), 1.0, 1.0, "humans disagree: the official metric cleans both sides anyway"),
    ("two", ["2", "2", "two"] + ten(("3", 7)), 0.9, 0.9, "mixed answers: already normalised by the official rule"),
    ("it's", ten(("it's", 10)), 1.0, 0.0, "EvalAI splits 's: a unanimous it's is missed after normalising"),
    ("1,000", ten(("1,000", 10)), 1.0, 0.0, "EvalAI deletes every comma: a unanimous 1,000 is missed"),
    ("dog", ten(("the dog", 10)), 0.0, 0.0, "the human answers are not normalised when unanimous"),
]


@pytest.mark.parametrize("pred,answers,raw,norm,why", NORMALISED_CASES, ids=[c[4] for c in NORMALISED_CASES])
def test_raw_and_normalised_scores(pred, answers, raw, norm, why):
    assert (vqa_score(pred, answers), vqa_score_normalised(pred, answers)) == pytest.approx((raw, norm), abs=1e-12)
    assert vqa_score_normalised(pred, answers) == ref.lmms_eval_score(pred, answers)  # bit-identical to lmms-eval's


def test_evalai_answer_matches_the_reference_processor():
    rng = random.Random(2)
    extra = ["It's red.", "The Two Dogs!", "1,000,000", "a/b", "ma'am's", "3.5.", "  Yes\t", "None", "ten?", "x - y",
             "he's", "'s", "(the) cat", "don't", "Wont", "o'clock", "yes,no", "2,3", "a,b 1,2"]
    for a in VOCAB + extra: assert evalai_answer(a) == ref.evalai_processor(a), a
    for _ in range(3000):
        pred, pool = rng.choice(VOCAB + extra), rng.sample(VOCAB + extra, rng.choice([1, 1, 2, 3]))
        answers = [rng.choice(pool) for _ in range(rng.choice([10, 10, 3]))]
        assert vqa_score_normalised(pred, answers) == ref.lmms_eval_score(pred, answers), (pred, answers)


def test_vqa_accuracy_reports_both_side_by_side():
    anns = [_ann(1, 1, "is there a", "yes/no", ten(("yes", 10))), _ann(2, 1, "how many", "number", ten(("2", 10))),
            _ann(3, 1, "what is the", "other", ten(("dog", 10))), _ann(4, 1, "what is the", "other", ten(("it's", 10)))]
    res = [{"question_id": 1, "answer": "Yes."}, {"question_id": 2, "answer": "two"},
           {"question_id": 3, "answer": "The dog"}, {"question_id": 4, "answer": "it's"}]
    acc = vqa_accuracy(res, None, {"annotations": anns})
    assert (acc["overall"], acc["overall_normalised"]) == (25.0, 75.0)
    assert acc["perAnswerType"] == {"yes/no": 0.0, "number": 0.0, "other": 50.0}
    assert acc["perAnswerType_normalised"] == {"yes/no": 100.0, "number": 100.0, "other": 50.0}
    assert acc["perQuestionType_normalised"]["how many"] == 100.0 and acc["perQuestionType"]["how many"] == 0.0
    assert acc["evalQA"] == {1: 0.0, 2: 0.0, 3: 0.0, 4: 100.0}
    assert acc["evalQA_normalised"] == {1: 100.0, 2: 100.0, 3: 100.0, 4: 0.0}
    assert acc["counts"]["changed_by_normalising"] == 4
    assert "as the model wrote them" in acc["scoring"]["overall"] and "EvalAI" in acc["scoring"]["overall_normalised"]
    theirs, _, _ = ref.evaluate(anns, {r["question_id"]: r["answer"] for r in res})
    assert theirs["overall"] == acc["overall"]  # the raw number is still the official one


def _ann(qid, img, qt, at, answers):
    return {"question_id": qid, "image_id": img, "question_type": qt, "answer_type": at,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def _random_dataset(n=300, seed=1):
    rng = random.Random(seed)
    types = [("what color is the", "other"), ("how many", "number"), ("is there a", "yes/no"), ("what is the", "other")]
    anns, results = [], []
    for qid in range(1, n + 1):
        qt, at = rng.choice(types)
        pool = rng.sample(VOCAB, rng.choice([1, 2, 3]))
        anns.append(_ann(qid, qid // 3, qt, at, [rng.choice(pool) for _ in range(10)]))
        if rng.random() < 0.9:
            results.append({"question_id": qid, "answer": rng.choice(pool + VOCAB[:5])})
    return anns, results


def test_vqa_accuracy_matches_reference():
    anns, results = _random_dataset()
    ours = vqa_accuracy(results, None, {"annotations": anns})
    theirs, eval_qa, _ = ref.evaluate(anns, {r["question_id"]: r["answer"] for r in results})
    assert {k: ours[k] for k in theirs} == theirs
    assert ours["evalQA"] == eval_qa
    assert ours["counts"]["overall"] == len(results) and ours["counts"]["missing"] == len(anns) - len(results)
    assert sum(ours["counts"]["perQuestionType"].values()) == len(results)
    assert 0 < ours["overall"] < 100 and len(ours["perQuestionType"]) == 4 and len(ours["perAnswerType"]) == 3


def test_vqa_accuracy_reads_files_and_refuses_bad_results(tmp_path):
    anns, results = _random_dataset(20)
    qs = {"questions": [{"question_id": a["question_id"], "image_id": a["image_id"], "question": "?"} for a in anns]}
    for name, obj in (("q.json", qs), ("a.json", {"annotations": anns}), ("r.json", results)):
        (tmp_path / name).write_text(json.dumps(obj))
    assert vqa_accuracy(tmp_path / "r.json", tmp_path / "q.json", tmp_path / "a.json") == vqa_accuracy(results, qs, {"annotations": anns})
    with pytest.raises(KeyError, match="question_id 999 is not in the annotations"):
        vqa_accuracy(results + [{"question_id": 999, "answer": "x"}], qs, {"annotations": anns})
    with pytest.raises(KeyError, match="question_id 1 is not in the questions"):
        vqa_accuracy([{"question_id": 1, "answer": "x"}], {"questions": []}, {"annotations": anns})
    with pytest.raises(ValueError, match="more than one result"):
        vqa_accuracy(results + results[:1], qs, {"annotations": anns})
    with pytest.raises(TypeError, match="answer must be a string"):
        vqa_accuracy([{"question_id": 1, "answer": 3}], qs, {"annotations": anns})
    with pytest.raises(FileNotFoundError, match="results file not found"):
        vqa_accuracy(tmp_path / "nope.json", qs, {"annotations": anns})
    with pytest.raises(DataError, match="annotations: expected a JSON object with a 'annotations' list"):
        vqa_accuracy(results, qs, {"questions": []})
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(DataError, match=f"annotations file {tmp_path / 'a.json'} is not JSON"):
        vqa_accuracy(results, qs, tmp_path / "a.json")


# ---- the evaluator and its controls -------------------------------------------------------------------------------

COLORS = {1: ("red", (220, 30, 30)), 2: ("green", (30, 200, 30)), 3: ("blue", (30, 30, 220)), 4: ("yellow", (230, 220, 30))}


def _vqa_world(root: Path, naming):
    "4 solid-colour images (different sizes), 2 questions each, written with `naming(image_id)`."
    for i, (_, rgb) in COLORS.items():
        Image.new("RGB", (20 + 4 * i, 16 + 2 * i), rgb).save(root / naming(i))
    qs = {"data_subtype": "test2015", "questions": []}
    anns = {"annotations": []}
    for i, (name, _) in COLORS.items():
        for j, (q, a, qt, at) in enumerate([("What color is it?", name, "what color is the", "other"),
                                           ("Is there a shape?", "yes", "is there a", "yes/no")]):
            qid = 10 * i + j
            qs["questions"].append({"question_id": qid, "image_id": i, "question": q})
            anns["annotations"].append(_ann(qid, i, qt, at, ten((a, 10))))
    return qs, anns


class Recorder:
    "A model function that names the colour of the centre pixel and records what it was given."

    def __init__(self): self.calls = []

    def __call__(self, images, prompts):
        self.calls.append((images, prompts))
        out = []
        for ims, p in zip(images, prompts):
            if not ims: out.append("yes"); continue
            rgb = ims[0].getpixel((ims[0].width // 2, ims[0].height // 2))
            out.append(next((n for n, c in COLORS.values() if c == rgb), "gray") if "color" in p else "yes")
        return out


def test_evaluate_vqa_end_to_end_with_controls(tmp_path):
    qs, anns = _vqa_world(tmp_path, lambda i: f"shape_{i}.png")
    fn = Recorder()
    r = evaluate_vqa(fn, qs, anns, tmp_path, out_path=tmp_path / "out" / "res.json", batch_size=3,
                     image_path_fn=lambda i: f"shape_{i}.png")
    assert r["overall"] == 100.0 and r["control"] == "none" and r["counts"]["overall"] == 8
    assert [len(p) for _, p in fn.calls] == [3, 3, 2]
    assert all(p.endswith("\nAnswer the question using a single word or phrase.") for _, ps in fn.calls for p in ps)
    saved = json.loads((tmp_path / "out" / "res.json").read_text())
    expected = [COLORS[q["image_id"]][0] if "color" in q["question"] else "yes" for q in qs["questions"]]
    assert saved == [{"question_id": q["question_id"], "answer": a} for q, a in zip(qs["questions"], expected)]
    assert all(set(x) == {"question_id", "answer"} for x in saved)
    assert json.loads((tmp_path / "out" / "res_metrics.json").read_text())["control"] == "none"

    # blank: same sizes, uniform grey; colour questions fail, yes/no ones still pass
    fn = Recorder()
    r = evaluate_vqa(fn, qs, anns, tmp_path, batch_size=8, control="blank", image_path_fn=lambda i: f"shape_{i}.png")
    ims = [ims[0] for ims in fn.calls[0][0]]
    assert [im.size for im in ims] == [(20 + 4 * i, 16 + 2 * i) for i in COLORS for _ in range(2)]
    assert all(im.getextrema() == ((128, 128),) * 3 for im in ims)
    assert r["control"] == "blank" and r["perQuestionType"] == {"what color is the": 0.0, "is there a": 100.0}

    # text_only: no images at all
    fn = Recorder()
    r = evaluate_vqa(fn, qs, anns, tmp_path, control="text_only", image_path_fn=lambda i: f"shape_{i}.png")
    assert all(ims == [] for images, _ in fn.calls for ims in images) and r["control"] == "text_only"
    assert r["overall"] == 50.0


def _seen_colors(fn):
    return [next(n for n, c in COLORS.values() if c == ims[0].getpixel((0, 0))) for images, _ in fn.calls for ims in images]


def test_shuffled_control_is_a_seeded_derangement(tmp_path):
    qs, anns = _vqa_world(tmp_path, lambda i: f"shape_{i}.png")
    runs = {}
    for seed in (0, 0, 1, 2, 3):
        fn = Recorder()
        r = evaluate_vqa(fn, qs, anns, tmp_path, control="shuffled", seed=seed, image_path_fn=lambda i: f"shape_{i}.png")
        seen = _seen_colors(fn)
        own = [COLORS[q["image_id"]][0] for q in qs["questions"]]
        assert all(s != o for s, o in zip(seen, own))                  # nobody keeps its own image
        assert seen[0::2] == seen[1::2]                                 # questions of one image get the same substitute
        assert sorted(set(seen)) == sorted(n for n, _ in COLORS.values())  # every image is used
        assert r["control"] == "shuffled" and r["perQuestionType"]["what color is the"] == 0.0
        runs.setdefault(seed, []).append(seen)
    assert runs[0][0] == runs[0][1]                                     # fixed seed, same permutation
    assert len({tuple(v[0]) for v in runs.values()}) > 1               # seeds differ


def test_evaluate_vqa_default_coco_naming_limit_and_errors(tmp_path):
    qs, anns = _vqa_world(tmp_path, lambda i: f"COCO_test2015_{i:012d}.jpg")  # data_subtype is test2015
    fn = Recorder()
    r = evaluate_vqa(fn, qs, anns, tmp_path, limit=3)
    assert r["counts"]["overall"] == 3 and r["counts"]["missing"] == 5
    assert len(fn.calls[0][0]) == 3
    with pytest.raises(FileNotFoundError, match=r"image 1 not found at .*shape_1.png"):
        evaluate_vqa(fn, qs, anns, tmp_path, image_path_fn=lambda i: f"shape_{i}.png")
    with pytest.raises(ValueError, match="must return 2 strings for the batch starting at question_id 10"):
        evaluate_vqa(lambda ims, ps: ["x"], qs, anns, tmp_path, batch_size=2)
    with pytest.raises(ValueError, match="unknown control 'noise'"):
        evaluate_vqa(fn, qs, anns, tmp_path, control="noise")
    bad = {"questions": [{"question_id": 10, "question": "?"}]}
    with pytest.raises(DataError, match=r"questions: question #0 \(question_id 10\) lacks \['image_id'\]"):
        evaluate_vqa(fn, bad, anns, tmp_path)


# ---- caption metrics -----------------------------------------------------------------------------------------------

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def test_caption_metrics_equal_pycocoevalcap(monkeypatch):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    coco = json.loads((FIX / "coco_captions_small.json").read_text())
    results = json.loads((FIX / "coco_captions_small_results.json").read_text())
    ours = caption_metrics(FIX / "coco_captions_small.json", FIX / "coco_captions_small_results.json", spice="auto")
    assert ours["n_images"] == 6
    if not spice_available():  # this machine: no Stanford models, so SPICE is skipped with a note (never downloaded)
        assert "SPICE" not in ours and "SPICE skipped" in ours["notes"][0]

    # reference 1: pycocoevalcap's scorers called directly
    gts = {i: [{"caption": a["caption"]} for a in coco["annotations"] if a["image_id"] == i] for i in range(1, 7)}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    tok, meteor = PTBTokenizer(), Meteor()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    direct = dict(zip(METRICS[:4], Bleu(4).compute_score(gts, res)[0]))
    for name, scorer in (("METEOR", meteor), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        direct[name] = scorer.compute_score(gts, res)[0]
    assert {k: ours[k] for k in METRICS} == pytest.approx(direct, rel=1e-12)

    # reference 2: pycocoevalcap's own COCOEvalCap over pycocotools' COCO objects, with its SPICE scorer
    # (whose constructor downloads Stanford models) replaced by a no-op: SPICE is not compared here.
    import pycocoevalcap.eval as pe
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res): return 0.0, [0.0] * len(res)
        def method(self): return "SPICE"
    monkeypatch.setattr(pe, "Spice", NoSpice)
    monkeypatch.setattr(pe, "Meteor", lambda: meteor)  # the same scorer, reusing its (slow to start) Java process
    c = COCO(str(FIX / "coco_captions_small.json"))
    e = pe.COCOEvalCap(c, c.loadRes(str(FIX / "coco_captions_small_results.json")))
    e.evaluate()
    assert {k: ours[k] for k in METRICS} == pytest.approx({k: e.eval[k] for k in METRICS}, rel=1e-12)
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] < 1 and ours["CIDEr"] > 0


def test_caption_metrics_spice_policy_and_errors(monkeypatch):
    coco = FIX / "coco_captions_small.json"
    one = [{"image_id": 1, "caption": "a man on a bike"}]
    with pytest.raises(KeyError, match="image_id 42 has no reference captions"):
        caption_metrics(coco, [{"image_id": 42, "caption": "x"}])
    with pytest.raises(ValueError, match="image_id 1 has more than one"):
        caption_metrics(coco, one * 2)
    with pytest.raises(KeyError, match=r"result #0 lacks \['caption'\]"):
        caption_metrics(coco, [{"image_id": 1}])
    if not spice_available():  # this machine: no Stanford models -> refused when required (skipped on "auto", above)
        with pytest.raises(RuntimeError, match="SPICE needs Java and the Stanford CoreNLP jars"):
            caption_metrics(coco, one, spice=True)
    else:  # a machine with the models: SPICE is computed
        assert 0 <= caption_metrics(coco, one, spice=True)["SPICE"] <= 1
    monkeypatch.setattr(ev.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install default-jre-headless"):
        caption_metrics(coco, one)
    assert not spice_available()


def test_evaluate_captions_end_to_end(tmp_path):
    coco = json.loads((FIX / "coco_captions_small.json").read_text())
    for im in coco["images"]:
        Image.new("RGB", (32, 32), (im["id"] * 40, 0, 0)).save(tmp_path / im["file_name"])
    refs = {im["id"]: next(a["caption"] for a in coco["annotations"] if a["image_id"] == im["id"]) for im in coco["images"]}
    prompts_seen = []

    def captioner(images, prompts):  # "recognises" the image by its red level and returns its first reference
        prompts_seen.extend(prompts)
        return [refs[ims[0].getpixel((0, 0))[0] // 40] if ims else "a picture" for ims in images]

    out = evaluate_captions(captioner, FIX / "coco_captions_small.json", tmp_path, out_path=tmp_path / "caps.json",
                            batch_size=4, limit=4, spice=False)
    assert out["n_images"] == 4 and out["control"] == "none" and out["CIDEr"] > 2 and out["Bleu_1"] > 0.9
    assert set(prompts_seen) == {"Describe the image briefly."}
    assert json.loads((tmp_path / "caps.json").read_text()) == [{"image_id": i, "caption": refs[i]} for i in (1, 2, 3, 4)]
    saved = json.loads((tmp_path / "caps_metrics.json").read_text())
    assert saved["CIDEr"] == out["CIDEr"] and saved["control"] == "none" and "results" not in saved
