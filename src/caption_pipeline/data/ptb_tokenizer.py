"""The Penn Treebank tokenizer that coco-caption scores with, in pure Python.

pycocoevalcap tokenizes every reference and candidate caption with Stanford CoreNLP 3.4.1's
PTBTokenizer (Java, `-preserveLines -lowerCase`). Training on text tokenized differently would
teach the model words the scorer never sees ("dog's" vs "dog" + "'s"), so this module redoes
that tokenizer's JFlex rules, restricted to what captions contain, with JFlex's semantics:
at each position the longest match wins (its trailing context counts toward the length), and
ties go to the rule listed first. The rules and word lists were calibrated against the 3.4.1
jar itself; the ones left out (most SGML entities, CP1252 control codes, strict-PTB3 options)
do not occur in captions. tests/test_text.py compares the two on a corpus of tricky captions.

Known differences from the scorer, all rare in captions:
- It tokenizes all captions as the lines of one file, and a few rules look past the end of a
  line: "the letter X." is "x" there when the next caption starts with "A", "The" ... (else
  "x."), and "No." / "fig." keep their period when the next one starts with a digit. Here a
  caption is tokenized alone: a line with nothing after it.
- Letters added to Unicode after 6.0 (U+037F, U+0978, U+05EF ...) are letters here; the 2014
  jar deletes them as "untokenizable".
- Line breaks other than "\n" (\r, \v, \f, U+0085, U+2028, U+2029) end a line there, which
  shifts every later caption of the scorer's batch; here they are spaces.
- Digits and letters run into a dotted acronym ("3DD.C.") split differently.
`caption_pipeline.data.text.tokenize` adds two deliberate ones (NFC, bracket tokens dropped).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["ptb_tokens"]


def _bmp_class(predicate: Callable[[str], bool]) -> str:
    """Body of a regex character class holding every BMP character that satisfies `predicate`.

    JFlex matched [:letter:] / [:digit:] on UTF-16 units, so characters above U+FFFF (emoji)
    are never letters there: they are "untokenizable" and deleted.
    """
    ranges, start = [], None
    for code in range(0x10001):
        inside = code < 0x10000 and predicate(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return "".join(ranges)


_ALPHA = _bmp_class(lambda c: unicodedata.category(c)[0] == "L")  # JFlex [:letter:]
_DIGITS = _bmp_class(lambda c: unicodedata.category(c) == "Nd")  # JFlex [:digit:]
# PTBLexer's LETTER (what WORDs are made of): [:letter:], the soft hyphen, and the combining
# marks and symbols of the scripts it lists.
_LETTERS = _ALPHA + (
    "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d"
    "\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525"
    "\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f"
    "\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f"
    "\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962"
    "\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03"
    "\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd"
    "\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e"
    "\u0eb1-\u0ebc\u0ec8-\u0ecd"
)

L = f"[{_LETTERS}]"
D = f"[{_DIGITS}]"
LD = f"[{_LETTERS}{_DIGITS}]"
A = f"[{_ALPHA}]"
AD = f"[{_ALPHA}{_DIGITS}]"
APOS = "(?:['\u0092\u2019]|&apos;)"
APOS_ETC = "(?:['`\u0092\u2019\u0091\u2018\u201b]|&apos;)"  # also seen inside words
SPACE = " \t\u00a0\u2000-\u200a\u3000"
SPACE_NL = SPACE + "\r\n\u2028\u2029\u000b\u000c\u0085"
WORD = f"{L}{LD}*(?:[.!?]{L}{LD}*)*"
REDAUX = f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
SREDAUX = f"(?i:n){APOS_ETC}(?i:t)"  # n't
ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
INSENTP = "[,;:]"  # punctuation inside a sentence
HYPHEN = "[-_\u058a\u2010\u2011]"
# Hyphenated (ASCII) words, words of letters and digits, and capitals joined by & or +.
HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO}\\.|[A-Za-z0-9\u00ad]+))+"
THING = f"(?:[dDoOlL]{APOS_ETC}{AD})?{AD}+(?:{HYPHEN}(?:[dDoOlL]{APOS_ETC}{AD})?{AD}+)*"
THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
SGML = (
    r"<(?:[!?][A-Za-z-][^>\r\n]*|/?[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+[A-Za-z][A-Za-z0-9_:.-]*"
    r"(?:[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.-]*))?)*[ ]*/?)[ ]*>"
)
# Words that start a new sentence after an acronym ("... in the U.S. The ..."): capital first.
_SENTENCE_STARTS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last "
    "Many More Mr\\. Ms\\. Now Once One Other Our She Since So Some Such That The Their Then There "
    "These They This We When While What Yet You"
).split()
SENTENCE_START = "|".join(
    f"{w[0]}(?i:{w[1:]})" for w in sorted(_SENTENCE_STARTS, key=len, reverse=True)
)


# Abbreviations that keep their period ("dr." "st." "etc."), as lists of 3.4.1 calibrated
# against the jar ("May", "Sat", "Sun", "Pt", "approx", "So" are not in them). JFlex is caseless
# except in character classes, so "[I]ll" takes "Ill." and "ILL." but not the word "ill.".
# ABBREV1 (months, states, companies...) also claims the next two characters in the
# longest-match race, so "etc.s" is "etc." + "s" while "dr.s" stays one WORD.
def _abbreviations(caseless: str, cased: str = "") -> str:
    words = sorted(caseless.split(), key=len, reverse=True)
    return f"(?:(?i:{'|'.join(words)}){cased})\\."


ABBREV1 = _abbreviations(
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
    "ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla "
    "penn tenn va vt wis wisc wyo inc co cos corp ltd plc rt bancorp bhd assn univ intl sys "
    "tel est ext sq jr sr bros blvd rd esq etc al seq bldg ed\\.d ph\\.d",
    "|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
    "|(?i:pp?t)[ye](?i:s)?",
)
ABBREV2 = _abbreviations(
    "mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev "
    "maj sgt cpl pvt mt capt st ste ave pres lieut hon brig comdr cmdr pfc spc supt supts det "
    "adj adv asst assoc ens insp mlle mme msgr sfc vs alex wm jos cie cf treas dept invt elec "
    "natl ft ph",
    "|(?i:m)[ft](?i:g)|[A-Za-z]",
)
FILE_EXTENSIONS = (  # "5x.jpg" is a file name (a WORD already takes "sign.jpg")
    "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|"
    "php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip"
)
ABBREV_BEFORE_NUMBER = r"(?i:figs?|prop|nos?|art|ca|pp|op)\."  # "No. 5", "fig. 3"

_LEFT_SINGLE = re.compile("[\u0091\u2018\u201b\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u2019\u203a]")
_LEFT_DOUBLE = re.compile("[\u0093\u201c\u00ab]")
_RIGHT_DOUBLE = re.compile("[\u0094\u201d\u00bb]")


def _latex_quotes(text: str, left: bool = False) -> str:
    """PTB3 quote normalization: ` `` for opening quotes, ' '' for closing ones."""
    text = re.sub("&apos;|'", "`" if left else "'", text)
    text = re.sub('"|&quot;', "``" if left else "''", text)
    text = _LEFT_SINGLE.sub("`", text)
    text = _RIGHT_SINGLE.sub("'", text)
    text = _LEFT_DOUBLE.sub("``", text)
    return _RIGHT_DOUBLE.sub("''", text)


_CURRENCY = str.maketrans(
    {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
)
_FRACTIONS = str.maketrans(
    {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
)
_PARENS = str.maketrans({"(": "-LRB-", ")": "-RRB-"})


def _no_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "")


def _clean_word(text: str) -> str:
    return re.sub("(?i:&amp;)", "&", _no_soft_hyphens(text))


def _nbsp(text: str) -> str:
    # PTBLexer's normalizeSpace: a token never holds a plain space ("3 1/2" -> "3\xa01/2").
    return text.replace(" ", "\u00a0")


# An action turns the matched text into (token or None, characters consumed): consuming less
# than the match is JFlex's yypushback ("cannot" -> "can", then "not" is lexed again).
Action = Callable[[str], tuple[str | None, int]]


def _emit(transform: Callable[[str], str] = str) -> Action:
    return lambda text: (transform(text), len(text))


def _const(token: str) -> Action:
    return lambda text: (token, len(text))


def _skip(text: str) -> tuple[None, int]:
    return None, len(text)


def _push_back(n: int) -> Action:
    return lambda text: (text[:-n], len(text) - n)


def _acronym_at_sentence_end(text: str) -> tuple[str, int]:
    # "letter X. The" ends a sentence: one letter gives its period back ("x" + "."), a longer
    # acronym keeps it ("u.s."; PTB then repeats the period as a token of its own, dropped).
    return (text[0], 1) if len(text) == 2 else (text, len(text))


class _Rule(NamedTuple):
    pattern: re.Pattern
    context: re.Pattern | None  # JFlex trailing context r1/r2: required, counted, not consumed
    action: Action


def _rules(
    alternatives: str | tuple[str, ...], action: Action, context: str | None = None
) -> list[_Rule]:
    """One rule per alternative, so the longest-match loop (not re's first match) picks."""
    if isinstance(alternatives, str):
        alternatives = (alternatives,)
    ctx = None if context is None else re.compile(context)
    return [
        _Rule(re.compile(alt if context is None else f"(?:{alt})(?={context})"), ctx, action)
        for alt in alternatives
    ]


_KEEP = _emit()
_QUOTE = _emit(_latex_quotes)
_RULES: list[_Rule] = [
    *_rules(r"(?i:c\+\+|[cf]#)", _KEEP),  # c++ c#
    *_rules(("(?i:cannot)", "'(?i:twas)"), _push_back(3)),  # can not, 't was
    *_rules((f"{APOS}(?i:tis)", "(?i:gonna|gotta|lemme|gimme|wanna)"), _push_back(2)),  # gon na
    *_rules(SGML, _emit(_nbsp)),  # tags stay whole
    *_rules("&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _const("--")),
    *_rules("(?i:&amp;)", _const("&")),
    *_rules("&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", _KEEP),
    *_rules(WORD, _emit(_no_soft_hyphens), context=REDAUX),  # dog|'s
    *_rules(  # do|n't
        r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", _emit(_no_soft_hyphens), context=SREDAUX
    ),
    *_rules(WORD, _emit(_no_soft_hyphens)),
    *_rules(  # apostrophe words that stay whole: o'clock rock 'n' roll, 'em, '90s, Shi'ite
        (
            f"{APOS}(?i:n){APOS}?",
            f"[lLdDjJ]{APOS}",
            f"(?i:dunkin|somethin|ol){APOS}",
            f"{APOS}(?i:em)",
            f"[A-HJ-XZn]{APOS_ETC}{A}{A}+",
            f"{APOS}[2-9]0(?i:s)",
            f"{APOS}(?i:till?)",
            f"{A}+[aeiouyAEIOUY]{APOS_ETC}[aeiouA-Z]{A}*",
            f"{APOS}(?i:cause)",
            r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
        ),
        _KEEP,
    ),
    *_rules(f"(?i:y){APOS}", _KEEP, context=A),  # y'|all
    *_rules(r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]", _KEEP),
    *_rules(
        r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
        r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
        r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
        _KEEP,
    ),
    *_rules(  # e-mail addresses
        r"[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@"
        r"(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00a0]+",
        _KEEP,
    ),
    *_rules(("@[a-zA-Z_][a-zA-Z_0-9]*", f"#{L}+"), _KEEP),  # @user #tag
    *_rules(REDAUX, _QUOTE, context="[^A-Za-z]"),
    *_rules(SREDAUX, _QUOTE),
    *_rules(f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}", _KEEP),  # dates
    *_rules(
        (f"[-+]?{D}+(?:[.:,\u00ad\u066b\u066c]{D}+)*", f"[-+]?(?:[.:,\u00ad\u066b\u066c]{D}+)+"),
        _emit(_no_soft_hyphens),
    ),
    *_rules(  # superscript and subscript numbers
        "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
        _KEEP,
    ),
    *_rules(f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", _emit(_nbsp)),  # 1/2
    *_rules("[\u00bc\u00bd\u00be\u2153-\u215e]", _emit(lambda t: t.translate(_FRACTIONS))),
    *_rules(
        (
            "-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-",
            r"(?i:c\.d\.s|pro-|anti-|s&p-500|s&ls)",
            f"(?i:cap){APOS}(?i:n)",
            f"(?i:c){APOS}(?i:est)",
        ),
        _KEEP,
    ),
    *_rules(  # and/or
        r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _KEEP
    ),
    *_rules((r"[A-Z]*\$", "#"), _KEEP),
    *_rules(  # currency signs
        "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        _emit(lambda t: t.translate(_CURRENCY)),
    ),
    *_rules(
        "[A-Za-z](?:\\.[A-Za-z])*\\.",
        _acronym_at_sentence_end,
        context=f"[{SPACE_NL}]+(?:{SENTENCE_START}|{SGML})[{SPACE_NL}]",
    ),
    *_rules(  # u.s. e.g. a.m.
        (
            f"{ACRO}\\.",
            r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))\.",
        ),
        _KEEP,
    ),
    *_rules(ABBREV_BEFORE_NUMBER, _KEEP, context=f"[{SPACE_NL}]?{D}"),
    *_rules(ABBREV1, _KEEP, context="[\\s\\S]{2}"),
    *_rules((ABBREV1, ABBREV2), _KEEP),
    *_rules(f"{APOS}[0-9][0-9]", _KEEP, context=f"[{SPACE_NL}]"),  # '90
    *_rules(f"{AD}+(?:\\.{AD}+)*\\.(?i:{FILE_EXTENSIONS})", _KEEP, context=f'[{SPACE_NL}.?!,"<]'),
    *_rules(f"{WORD}\\.", _emit(_no_soft_hyphens), context=INSENTP),  # "etc.," keeps its period
    *_rules(  # phone numbers
        "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
        "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}",
        _emit(lambda t: _nbsp(t).translate(_PARENS)),
    ),
    *_rules('"|(?i:&quot;)', _const("``"), context="[A-Za-z0-9$]"),
    *_rules('"|(?i:&quot;)', _const("''")),
    *_rules(("\\+", "[%&\u2030\u2031]", "[~^]", r"[|\\]"), _KEEP),
    *_rules(r"(?i:&lt;)|<", _const("<")),
    *_rules(r"(?i:&gt;)|>", _const(">")),
    *_rules(  # smileys
        r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]",
        _emit(lambda t: t.translate(_PARENS)),
        context="[^A-Za-z0-9]",
    ),
    *_rules(
        (r"[-^x=~<>']_[-^x=~<>']", r"\([-^x=~<>'][_.]?[-^x=~<>']\)", r"\([\^x=~<>']-[\^x=~<>'`]\)"),
        _emit(lambda t: t.translate(_PARENS)),
    ),  # ^_^
    *_rules(r"\(", _const("-LRB-")),
    *_rules(r"\)", _const("-RRB-")),
    *_rules(r"\[", _const("-LSB-")),
    *_rules(r"\]", _const("-RSB-")),
    *_rules(r"\{", _const("-LCB-")),
    *_rules(r"\}", _const("-RCB-")),
    *_rules("-+", _emit(lambda t: "--" if 3 <= len(t) <= 4 else t)),
    *_rules((r"\.{3,5}", "(?:\\.[ \u00a0]){2,4}\\.", "[\u0085\u2026]"), _const("...")),
    *_rules(("@+", "#+", "_+", r"\*+", r"(?:\\\*){1,3}", INSENTP, "[?!]+"), _KEEP),
    *_rules(("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]", "=", "/"), _KEEP),
    *_rules((HTHING, THING, THINGA), _emit(_clean_word)),  # x-ray 5th 3d under_score AT&T
    *_rules((f"{HTHING}\\.", f"{THING}\\.", f"{THINGA}\\."), _emit(_clean_word), context=INSENTP),
    *_rules("'", _const("`"), context="[A-Za-z][^ \t\n\r\u00a0]"),  # opening quote
    *_rules(REDAUX, _QUOTE),
    *_rules(
        (APOS, "''", "[`\u2018-\u201b\u201c-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]{1,2}"),
        _QUOTE,
    ),
    *_rules(("<<", ">>"), _KEEP),
    *_rules(  # symbols that are tokens of their own
        "[\u00a6-\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3\u05c6"
        "\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d"
        "\u07f6-\u07f8\u0964\u0965\u0e4f\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042"
        "\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u2bff\u3001\u3002\u3012\u30fb"
        "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]",
        _KEEP,
    ),
    *_rules((f"[{SPACE_NL}]+", "[\u200b\u200e\u200f\ufeff\x00]", "(?i:&nbsp;)"), _skip),
]

# Most of a caption is plain words between single spaces: those are tokens as they stand
# (no rule matches longer or splits them), except the few that PTB splits ("can not").
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n])")
_SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})


def ptb_tokens(text: str) -> list[str]:
    """Tokens of `text` as Stanford PTBTokenizer 3.4.1 gives them (case and punctuation kept)."""
    # Lexed as a line of the scorer's input file: some rules' trailing context needs the
    # newline after it (":)" is a smiley before a newline, not at the end of the file).
    text += "\n"
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] == " ":
            pos += 1
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group().lower() not in _SPLIT_WORDS:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best, best_length = None, 0
        for rule in _RULES:
            match = rule.pattern.match(text, pos)
            if match is None:
                continue
            length = match.end() - pos
            if rule.context is not None:
                length += rule.context.match(text, match.end()).end() - match.end()
            if length > best_length:
                best, best_length = (rule, match), length
        if best is None:  # "untokenizable" (emoji, controls): PTBTokenizer deletes it
            pos += 1
            continue
        token, consumed = best[0].action(best[1].group())
        if token is not None:
            tokens.append(token)
        pos += consumed
    return tokens
