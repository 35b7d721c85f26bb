"""Pure-Python PTB tokenisation, as coco-caption applies it before scoring.

coco-caption (pycocoevalcap) tokenises every caption with Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` (a Java subprocess) and then drops a fixed
list of punctuation tokens. Scores are only comparable with published numbers when
the tokens are the same, so this module re-implements that lexer's behaviour for
the text captions contain, without Java.

How it works: like the JFlex lexer it imitates, a scanner tries every rule at the
current position and keeps the longest match (trailing context counts towards the
length, as in JFlex); ties go to the earlier rule. Each rule is a regex whose group
``tok`` is the token and whose remainder is trailing context, plus an optional
action that rewrites the token or gives part of it back. The rules and their order
were checked against the real Java tokenizer (see ``tests/test_metrics.py``).

Known limits: rare Unicode symbols outside Latin-1 and the common punctuation
blocks, SGML markup and exotic URLs may tokenise differently from Java. A carriage
return or other line separator inside a caption is treated as a space (Java would
start a new output line there and misalign every later caption).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["PUNCTUATION", "ptb_tokenize", "ptb_tokenize_lines", "tokenize_captions"]

# Tokens pycocoevalcap removes after tokenising. Case-sensitive: the Java tokenizer
# lowercases first, so "-LRB-" never occurs and "-lrb-"/"-rrb-" survive, as in coco-caption.
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# ---------------------------------------------------------------- character classes


def _char_class(categories: tuple[str, ...]) -> str:
    """Regex class body (as ranges) for the BMP characters of the given Unicode categories."""
    codes = [c for c in range(0x80, 0x10000) if unicodedata.category(chr(c)) in categories]
    ranges: list[list[int]] = []
    for c in codes:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(f"\\u{a:04x}-\\u{b:04x}" if a < b else f"\\u{a:04x}" for a, b in ranges)


# Java's [:letter:] is Unicode category L*; Python's \w also admits numerals of
# categories No/Nl (superscripts, vulgar fractions), which the lexer does not.
# Soft hyphens, combining accents and spacing modifier letters do join words.
L = rf"(?:[^\W\d_{_char_class(('No', 'Nl'))}]|[\u00ad\u0300-\u036f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff])"
LD = rf"(?:{L}|\d)"  # letter or digit
APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOS_ETC = r"(?:['\u0092\u2019`\u0091\u2018\u201b]|(?i:&apos;))"  # apostrophe-like marks inside words
SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
SPACE_NL = r"[ \t\u00a0\u2000-\u200a\u3000\n\r\x0b\x0c\x85\u2028\u2029]"
NOT_SPACE_NL = r"[^ \t\u00a0\u2000-\u200a\u3000\n\r\x0b\x0c\x85\u2028\u2029]"
HYPHEN = r"[-_\u058a\u2010\u2011]"
NOT_ASCII_LETTER = r"[^A-Za-z]"

WORD = rf"{L}{LD}*(?:[.!?]{L}{LD}*)*"  # "dog.cat" and "yahoo!com" stay one token
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
SWORD = r"[A-Za-z]*[A-MO-Za-mo-z]"  # a word that can precede n't (so "don't" -> do n't)
SREDAUX = rf"(?i:n){APOS_ETC}(?i:t)"
NUM = r"(?:\d+(?:[.:,\u00ad\u066b\u066c\u2009\u202f]\d+)*|\d*(?:[.:,\u00ad\u066b\u066c]\d+)+)"
NUMBER = rf"[-+]?{NUM}"
ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r)))"
ACRO2 = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r)))"
THING = (  # hyphenated words: 80-year-old, 3-4, o'clock
    rf"(?:[dDoOlL]{APOS_ETC}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOS_ETC}{LD})?{LD}+)*"
)
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\.|[A-Za-z0-9\u00ad]+))+"
THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"  # AT&T
INSENTP = r"[,;:\u3001]"

# Abbreviations. (?i:...) parts are caseless; bare capitals must be capitals, as in
# the lexer (it is caseless except inside character classes), so "az." is a word.
_ABBREV1 = (  # usually followed by lower case; keeps its period
    r"(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
    r"|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo"
    r"|inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\.d|esq"
    r"|etc|al|seq|bldg|blvd|rd)"
    r"|A(?i:z)|A(?i:rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass)|M(?i:iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
    r"|(?i:pp?t)[ye](?i:s)?"  # Pty, Pte, Ptys: the [ye] class is case-sensitive
)
_TITLES = (  # acronyms and titles: usually followed by a capitalised word, so they keep their period
    rf"{ACRO}|(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt"
    r"|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
    r"|invt|elec|natl|dept|vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)"
    rf"|M(?i:iss)|v|(?i:m)[ft](?i:g)"
)
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)"  # keep the period only before a number
# A one-letter acronym before one of these capitalised words is a letter plus a full stop.
_SENTENCE_STARTERS = (
    r"A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)|I(?i:f|n|t)"
    r"|L(?i:ast)|M(?i:any|ore)|M(?i:r|s)\.|N(?i:ow)|O(?i:nce|ne|ther|ur)|S(?i:he|ince|o|ome|uch)"
    r"|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou)"
)

# ------------------------------------------------------------------------ normalisers
_LEFT_SINGLE, _RIGHT_SINGLE = "\u0091\u2018\u201b\u2039", "\u0092\u2019\u203a"
_LEFT_DOUBLE, _RIGHT_DOUBLE = "\u0093\u201c\u00ab", "\u0094\u201d\u00bb"
_ASCII_DOUBLE = re.compile(r"\"|''|'`|`'|&quot;")


def _latex_quotes(token: str, opening: bool) -> str:
    """Map quote characters to PTB's `` ` ' '' (ASCII ones by guessed direction)."""
    token = token.replace("&apos;", "'")
    if opening:
        token = _ASCII_DOUBLE.sub("``", token.replace("'", "`"))
    else:
        token = _ASCII_DOUBLE.sub("''", token)
    for chars, latex in (
        (_LEFT_SINGLE, "`"),
        (_RIGHT_SINGLE, "'"),
        (_LEFT_DOUBLE, "``"),
        (_RIGHT_DOUBLE, "''"),
    ):
        for c in chars:
            token = token.replace(c, latex)
    return token


def _closing_quotes(token: str) -> str:
    return _latex_quotes(token, opening=False)


def _opening_quotes(token: str) -> str:
    return _latex_quotes(token, opening=True)


def _word(token: str) -> str:
    # Soft hyphens only mark where a line may break; a lone one reads as a hyphen.
    return token.replace("\u00ad", "") or "-"


_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _parens(token: str) -> str:
    return token.replace("(", "-LRB-").replace(")", "-RRB-")


def _number(token: str) -> str:
    # Soft hyphens and thin spaces inside numbers are layout, not content.
    return re.sub("[\u00ad\u066c\u2009\u202f]", "", token)


def _spaces_to_nbsp(token: str) -> str:
    # PTB tokens never contain spaces: fractions like "3 1/2" keep a no-break space.
    return re.sub(r"[ \r\n]", "\u00a0", token)


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}

# --------------------------------------------------------------------------- rules
_TAG = r"[A-Za-z0-9_:.-]"
_URL_PATH = r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"


@dataclass(frozen=True)
class _Rule:
    """One lexer rule: ``pattern`` matches the token (group ``tok``) plus trailing context.

    ``keep`` optionally shortens the token (the rest is lexed again, like JFlex's
    yypushback); ``rewrite`` normalises the kept text.
    """

    pattern: re.Pattern[str]
    rewrite: Callable[[str], str] | None = None
    keep: Callable[[str], int] | None = None


def _rule(token: str, context: str = "", rewrite=None, keep=None) -> _Rule:
    return _Rule(re.compile(f"(?P<tok>{token}){context}"), rewrite, keep)


def _keep_all_but(n: int) -> Callable[[str], int]:
    return lambda tok: len(tok) - n


def _one_letter_acronym(tok: str) -> int:
    # "I." before "The": the letter is a word and the period ends the sentence.
    return 1 if len(tok) == 2 else len(tok)


_RULES: tuple[_Rule, ...] = (
    # assimilations are split: cannot -> can not, gonna -> gon na, 'tis -> 't is
    _rule(r"(?i:cannot|'twas)", keep=_keep_all_but(3)),
    _rule(r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", keep=_keep_all_but(2)),
    _rule(r"(?i:c\+\+|[cf]#)"),
    _rule(  # simple SGML/HTML tags stay whole
        rf"<(?:[!?][A-Za-z-][^>\r\n]*|/[A-Za-z]{_TAG}*"
        rf"|[A-Za-z]{_TAG}*(?:[ ]+[A-Za-z]{_TAG}*(?:[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?)*[ ]*/?)[ ]*>",
        rewrite=_spaces_to_nbsp,
    ),
    _rule(r"(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", rewrite=lambda _: "--"),
    _rule(r"(?i:&amp;)", rewrite=lambda _: "&"),
    _rule(r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#\d+);)"),
    _rule(WORD, REDAUX, rewrite=_word),  # it|'s
    _rule(SWORD, SREDAUX, rewrite=_word),  # do|n't
    _rule(WORD, rewrite=_word),
    _rule(  # words with an apostrophe inside that stay whole
        rf"{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:dunkin|somethin|ol){APOS}|{APOS}(?i:em|till?|cause|[2-9]0s)"
        rf"|[A-HJ-XZn]{APOS_ETC}{L}{{2}}{L}*|{L}+[aeiouyAEIOUY]{APOS_ETC}[aeiouA-Z]{L}*"
        rf"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:o){APOS_ETC}(?i:o)",
    ),
    _rule(rf"(?i:y){APOS}", L),  # y'all -> y' all
    _rule(r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"),
    _rule(r"(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}" + _URL_PATH),
    # The lexer's class here holds the range ",-_", which also excludes digits and capitals.
    _rule(r"(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2c-\x5f$]+\.)+(?i:com|net|org|edu)" + _URL_PATH),
    _rule(  # e-mail addresses
        r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
        r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:(?i:&gt;)|>)?"
    ),
    _rule(rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{L}+"),  # @user #hashtag
    _rule(REDAUX, NOT_ASCII_LETTER, rewrite=_closing_quotes),  # 's before a non-letter
    _rule(SREDAUX, NOT_ASCII_LETTER, rewrite=_closing_quotes),
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),  # dates
    _rule(NUMBER, rewrite=_number),
    _rule(r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    _rule(r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", rewrite=_spaces_to_nbsp),  # 3 1/2
    _rule("[\u00bc-\u00be\u2153-\u215e]", rewrite=lambda c: _FRACTIONS.get(c, c)),
    _rule(  # treebank specials
        rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
        rf"|(?i:cap){APOS}(?i:n)|(?i:c){APOS}(?i:est)"
    ),
    _rule(  # starred-out swearing keeps its asterisks
        r"(?i:f[-*][-c*]k(?:in[g']?|e[dr])?|(?:bull|dip)?sh[-*]t(?:ty|e|box)?|c[-*]nts?|p[-*]ss(?:e[sd]|ing)?|c[-*]ck"
        r"|b[-*]tch|t[-*]ts|tw[-*]ts?|cr[-*]p|d[-*]cks?|b[-*][-*s]t[-*]rds?|pr[-*]ck|d[-*]mn|bl[-*]{2}dy)"
    ),
    _rule(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),  # and/or
    _rule(r"[A-Z]*\$|#"),
    _rule("[" + "".join(_CURRENCY) + "\u00a5\u20a4\uffe0\uffe1\uffe5\uffe6]", rewrite=lambda c: _CURRENCY.get(c, c)),
    _rule(rf"{ACRO}\.", rf"{SPACE_NL}+(?:{_SENTENCE_STARTERS}){SPACE_NL}", keep=_one_letter_acronym),
    _rule(rf"{_ABBREV3}\.", rf"{SPACE_NL}?\d"),  # no. 5
    _rule(r"(?i:pt[ey]|co)\.", rf"{SPACE}(?i:ltd|lim)"),
    _rule(rf"(?:{_ABBREV1})\.", r"[\s\S]{2}"),  # the two-character context only lengthens the match
    _rule(rf"(?:{_ABBREV1})\."),
    _rule(rf"(?:{_TITLES})\."),
    _rule(rf"(?:{_TITLES})", SPACE),
    _rule(ACRO, SPACE_NL),
    _rule(rf"{APOS}\d\d", SPACE_NL),  # the '90 season
    _rule(  # file names
        r"[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*\.(?i:bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g"
        r"|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)",
        rf"(?:{SPACE_NL}|[.?!,])",
    ),
    _rule(rf"{WORD}\.", INSENTP, rewrite=_word),  # "dog.," keeps its period
    _rule(  # phone numbers
        r"(?:\(\d{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:\d{2,4}[- \u00a0])?\d{2,4}[- \u00a0])\d{3,4}[- \u00a0]?\d{3,5}",
        rewrite=lambda t: _parens(_spaces_to_nbsp(t)),
    ),
    _rule(r"(?:(?:\+\+?)?\d{2,4}\.)?\d{2,4}\.\d{3,4}\.\d{3,5}"),
    _rule(r"\"|(?i:&quot;)", rf"(?:{LD}|\$)", rewrite=_opening_quotes),  # "word
    _rule(r"\"|(?i:&quot;)|''", rewrite=_closing_quotes),
    _rule(r"<|(?i:&lt;)", rewrite=lambda _: "<"),
    _rule(r">|(?i:&gt;)", rewrite=lambda _: ">"),
    _rule(r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]", rewrite=_parens),  # :-)
    _rule(  # Asian-style smileys: ^_^ (>_<)
        r"[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)", rewrite=_parens
    ),
    _rule(r"[(){}\[\]]", rewrite=_BRACKETS.get),
    _rule(r"-+", rewrite=lambda t: "--" if len(t) in (3, 4) else t),
    _rule(r"\.{3,5}|[\u0085\u2026]|\.[ \u00a0](?:\.[ \u00a0]){1,3}\.", rewrite=lambda _: "..."),  # ... and . . .
    _rule(r"@+|#+|_+|\*+|(?:\\\*){1,3}"),
    _rule(rf"{INSENTP}|[?!]+|[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002=/]"),
    _rule(HTHING, rewrite=_word),
    _rule(rf"{HTHING}\.", INSENTP, rewrite=_word),
    _rule(THING),
    _rule(rf"{THING}\.", INSENTP),
    _rule(THINGA, rewrite=lambda t: t.replace("&amp;", "&")),
    _rule(rf"{THINGA}\.", INSENTP, rewrite=lambda t: t.replace("&amp;", "&")),
    _rule(  # quotes: an ASCII one before a word is probably opening
        r"'|[`\u2018\u201a-\u201f\u0091\u0093\u0094\u2039\u203a\u00ab\u00bb]{1,2}",
        rf"[A-Za-z]{NOT_SPACE_NL}",
        rewrite=_opening_quotes,
    ),
    _rule(rf"[`\u2018-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}}|{APOS}", rewrite=_closing_quotes),
    _rule(REDAUX, rewrite=_closing_quotes),
    _rule(SREDAUX, rewrite=_closing_quotes),
    _rule(r"<<|>>"),
    _rule(  # symbols that stand alone
        r"[+%&~^|\\\u00a6-\u00a9\u00ac\u00ae-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387\u2016\u2017\u2020-\u2023"
        r"\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207e\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff"
        r"\u3001\u3002\u3005\u3006\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]"
    ),
)

_SPACE_RE = re.compile(f"{SPACE}+|[\u200b\u200e\u200f\ufeff\x7f\x00]")
# A run of plain ASCII letters between spaces is always a single word unless it is
# one of the split assimilations; skipping the rule loop for it makes tokenising fast.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|$)")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str) -> list[list[str]]:
    """Tokenise ``text`` (lines joined by "\\n") into lowercased raw PTB tokens per line."""
    lines: list[list[str]] = [[]]
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char == "\n":
            lines.append([])
            pos += 1
            continue
        space = _SPACE_RE.match(text, pos)
        if space:
            pos = space.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and (pos == 0 or text[pos - 1] in " \n") and plain.group().lower() not in _ASSIMILATIONS:
            lines[-1].append(plain.group().lower())
            pos = plain.end()
            continue
        best, best_len = None, 0
        for rule in _RULES:
            m = rule.pattern.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best, best_len = (rule, m), m.end() - pos
        if best is None:  # untokenizable character: the lexer deletes it
            pos += 1
            continue
        rule, m = best
        token = m.group("tok")
        if rule.keep is not None:
            token = token[: rule.keep(token)]
        pos += len(token)
        if rule.rewrite is not None:
            token = rule.rewrite(token)
        lines[-1].append(token.lower())
    return lines


def _clean(caption: str) -> str:
    # pycocoevalcap joins captions with "\n" after replacing newlines by spaces; other
    # line breaks would shift Java's output lines, so they become spaces too.
    return re.sub(r"[\n\r\x0b\x0c\x85\u2028\u2029]", " ", caption)


def ptb_tokenize_lines(captions: Iterable[str]) -> list[str]:
    """Tokenise captions exactly as one pycocoevalcap ``PTBTokenizer`` call would.

    The captions are lexed as one text, as Java sees the file, because a few rules
    look past the end of a line (e.g. "I." before a next caption starting "The").
    Returns one space-joined, lowercased string per caption with coco-caption's
    punctuation tokens removed.
    """
    captions = [_clean(c) for c in captions]
    if not captions:
        return []
    lines = _lex("\n".join(captions))
    return [" ".join(t for t in tokens if t not in PUNCTUATION) for tokens in lines]


@functools.lru_cache(maxsize=65536)  # training scores the same references again and again
def ptb_tokenize(text: str) -> str:
    """Tokenise one caption: lowercased PTB tokens joined by spaces, punctuation removed.

    >>> ptb_tokenize("A man's riding a wave (on a surfboard).")
    "a man 's riding a wave -lrb- on a surfboard -rrb-"
    """
    return ptb_tokenize_lines([text])[0]


def tokenize_captions(captions: Mapping[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """Tokenise ``{key: [caption, ...]}`` like ``PTBTokenizer().tokenize`` (without Java).

    Unlike pycocoevalcap, the values are plain strings rather than ``{"caption": ...}``
    dicts. Keys keep their order; every caption list keeps its length.
    """
    if any(isinstance(caps, str) for caps in captions.values()):
        raise TypeError("tokenize_captions expects {key: [caption, ...]}, got a bare string as a value")
    flat = [c for caps in captions.values() for c in caps]
    tokenized = iter(ptb_tokenize_lines(flat))
    return {key: [next(tokenized) for _ in caps] for key, caps in captions.items()}
