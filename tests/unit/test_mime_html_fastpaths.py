"""The C-speed paths of mime_html give what the plain Python they replace gives."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd import mime_html as mh

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PIECES = st.sampled_from(
    [
        "<a href='http://a.example/x'>",
        '<A HREF="www.b.example">',
        "<a title=t href=x>",
        "</a>",
        "<a href='&amp;q=1'>",
        "<a href='&#xe001;'>",
        "link",
        " ",
        "\n",
        "&amp;",
        "&#66;",
        "&",
        "\ue000",
        "\u200b",
        "\xa0",
        "www.c.example",
        "http://",
        "://",
        "www.",
        "x.y",
        "mailto:",
        "<",
        "<!--",
        "<img src=i>",
        "<p>",
        "é",
    ]
)
_MARKUP = st.lists(_PIECES, max_size=40).map("".join)


@FUZZ
@given(_MARKUP)
def test_anchor_only_path_matches_the_token_loop(markup: str) -> None:
    markup = mh._rewrite_plain_tags(markup.replace("\ue000", "").replace("\ue001", ""))
    fast = mh._render_anchors_only(markup, 10_000)
    if fast is not None:
        assert fast == mh._render_tokens(markup, 10_000)


@FUZZ
@given(st.one_of(_MARKUP, st.text(max_size=200)))
def test_url_starts_match_finditer(text: str) -> None:
    expected = [m.span() for m in mh._TEXT_URL_RE.finditer(text)]
    assert [m.span() for m in mh._text_url_matches(text)] == expected


@FUZZ
@given(st.one_of(_MARKUP, st.text(max_size=200)))
def test_collapse_pieces_matches_per_piece_split(text: str) -> None:
    expected = [" ".join(piece.split()) for piece in text.split("\ue000")]
    assert mh._collapse_pieces(text, "\ue000") == expected
