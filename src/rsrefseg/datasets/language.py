"""Expressions that are not English (Chinese, or Chinese mixed with English), which some releases
carry (NWPU-Refer): a reader keeps or leaves them out (`keep_non_english`) and always says how many
it saw, in a note that prepare lists in the manifest's warnings."""

from __future__ import annotations

import re
from typing import Optional

from .triplet import Issue, IssueHandler

# CJK ideographs and symbols, kana, hangul, full-width forms.
_NON_ENGLISH = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def is_non_english(phrase: str) -> bool:
    """Whether `phrase` holds a Chinese (or other CJK) character, alone or mixed with English."""
    return bool(_NON_ENGLISH.search(phrase))


class LanguageFilter:
    """keep_phrase for a reader: counts the non-English phrases and keeps them or not."""

    def __init__(self, keep_non_english: bool):
        self.keep, self.seen = bool(keep_non_english), 0

    def __call__(self, phrase: str) -> bool:
        if not is_non_english(phrase):
            return True
        self.seen += 1
        return self.keep

    def report(self, on_issue: IssueHandler, where: str) -> None:
        """Pass the count to `on_issue` as a note for the manifest (nothing to say without a
        handler, or when there were none: a note is no error)."""
        note = self.note(where)
        if note is not None and on_issue is not None:
            on_issue(note)

    def note(self, where: str) -> Optional[Issue]:
        """The count, as a note for the manifest (None when there were none)."""
        if not self.seen:
            return None
        fate = "kept (keep_non_english)" if self.keep else "left out (keep_non_english keeps them)"
        return Issue(f"{self.seen} expression(s) are not English (Chinese or mixed): {fate}", where=where, kind="note")
