"""METEOR 1.5 through the jar that pycocoevalcap ships (needs Java), as coco-caption runs it.

There is no faithful pure-Python METEOR (it uses WordNet synonyms and a paraphrase table),
so the score comes from the jar, driven with the same protocol as pycocoevalcap's
``Meteor``: one ``SCORE`` line per caption returns its statistics, one ``EVAL`` line with
all of them returns the per-caption scores and the corpus score (which is *not* the mean
of the per-caption ones). This wrapper differs only in plumbing: Java's stderr is not a
pipe nobody reads (a full pipe would block the JVM), and the process is closed when done.

When Java or pycocoevalcap is missing, :func:`meteor_scores` returns ``None``: a missing score
must never read as a score of 0.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["meteor_scores", "meteor_jar"]

logger = logging.getLogger(__name__)


def meteor_jar() -> Path | None:
    """Path of pycocoevalcap's ``meteor-1.5.jar``, or None when pycocoevalcap is not installed."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
    except ModuleNotFoundError:
        return None
    if spec is None or spec.origin is None:
        return None
    jar = Path(spec.origin).with_name("meteor-1.5.jar")
    return jar if jar.is_file() else None


@functools.cache
def _warn_unavailable(reason: str) -> None:
    # functools.cache makes this log once per reason per process
    logger.warning("METEOR is not computed (reported as None): %s", reason)


def _unavailable_reason() -> str | None:
    if shutil.which("java") is None:
        return "no `java` on PATH"
    if meteor_jar() is None:
        return "pycocoevalcap (which ships the METEOR jar) is not installed"
    return None


def _one_line(text: str) -> str:
    # a newline would end the request early (tokenised captions have none)
    return text.replace("\r", " ").replace("\n", " ")


def _score_line(candidate: str, refs: Sequence[str]) -> str:
    # as pycocoevalcap: "|||" separates fields, so it is dropped from the candidate
    candidate = candidate.replace("|||", "").replace("  ", " ")
    return " ||| ".join(["SCORE", *(_one_line(r) for r in refs), _one_line(candidate)])


def meteor_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray] | None:
    """Corpus and per-caption METEOR of tokenised captions, or None when Java/pycocoevalcap is missing.

    ``candidates[i]`` is scored against ``references[i]``. Starting the JVM and loading the
    paraphrase table takes a few seconds, so call this once per evaluation.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates or any(not refs for refs in references):
        raise ValueError("METEOR needs at least one candidate and one reference per candidate")
    reason = _unavailable_reason()
    if reason is not None:
        _warn_unavailable(reason)
        return None
    jar = meteor_jar()
    command = ["java", "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with subprocess.Popen(
        command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as process:

        def ask(line: str) -> str:
            try:
                process.stdin.write(f"{line}\n".encode())
                process.stdin.flush()
            except BrokenPipeError as error:
                raise RuntimeError(f"the METEOR jar ({jar}) exited unexpectedly") from error
            answer = process.stdout.readline().decode().strip()
            if not answer:
                raise RuntimeError(f"the METEOR jar ({jar}) exited unexpectedly")
            return answer

        try:
            stats = [ask(_score_line(c, refs)) for c, refs in zip(candidates, references)]
            per_caption = [float(ask(" ||| ".join(["EVAL", *stats])))]
            per_caption += [float(process.stdout.readline().decode().strip()) for _ in range(len(stats))]
        finally:
            process.kill()  # the jar would otherwise wait for more requests
    # the jar answers the per-caption scores first, then the corpus score
    corpus = per_caption.pop()
    return corpus, np.array(per_caption)
