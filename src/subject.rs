//! NATS subject and subject-pattern logic: validation, matching, containment,
//! overlap, and prefix mapping through a JetStream RePublish.
//!
//! Subjects are `.`-separated, non-empty tokens. A pattern may also use `*`
//! (exactly one token) and `>` (one or more tokens, only as the last token).
//! `matches`, `contains` and `overlaps` are on hot paths: they walk both token
//! streams in lockstep and never allocate. They assume their inputs were
//! validated; on invalid input they return some answer but never panic, and
//! `contains` fails closed: a malformed outer pattern (a grant from a token)
//! contains nothing.
//!
//! Over 400 lines only because the property tests (against a brute-force
//! model) live beside the functions they check.

/// Sanity cap against abusive input (e.g. a pattern taken from a JWT claim).
const MAX_LEN: usize = 1024;

/// Why a subject or pattern was rejected. Fields carry the offending text;
/// messages use `{:?}` so that control characters appear escaped, not raw.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject must not be empty")]
    Empty,
    #[error("subject {0:?} contains an empty token (leading, trailing or doubled '.')")]
    EmptyToken(String),
    #[error(
        "token {0:?} is invalid: tokens must not contain whitespace or control characters, \
         and '*' or '>' must stand alone as a whole token (and are not allowed in concrete subjects)"
    )]
    InvalidToken(String),
    #[error(
        "subject {0:?} is not valid text (it held bytes that are not UTF-8, or U+FFFD); percent-encode subjects as UTF-8"
    )]
    NotText(String),
    #[error("pattern {0:?} uses '>' before its last token; '>' may only be the last token")]
    FullWildcardNotLast(String),
    #[error("subject is longer than {MAX_LEN} bytes")]
    TooLong,
}

/// Validate a pattern (wildcards allowed).
pub fn validate_pattern(p: &str) -> Result<(), SubjectError> {
    validate(p, true)
}

/// Validate a concrete subject (no wildcards allowed; `*` or `>` token is an
/// `InvalidToken` error).
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    validate(s, false)
}

fn validate(s: &str, wildcards: bool) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > MAX_LEN {
        return Err(SubjectError::TooLong);
    }
    // What a decoder put in place of bytes that were not UTF-8: the client
    // did not ask for this subject (NATS refuses it too).
    if s.contains('\u{FFFD}') {
        return Err(SubjectError::NotText(s.to_owned()));
    }
    let mut tokens = s.split('.').peekable();
    while let Some(tok) = tokens.next() {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken(s.to_owned()));
        }
        let is_wildcard = tok == "*" || tok == ">";
        // Whitespace as NATS forbids it, and every other control character
        // (NUL, form feed, escapes): none can be delivered or logged safely.
        let bad_char = |c: char| c == ' ' || c.is_control() || c == '*' || c == '>';
        if (is_wildcard && !wildcards) || (!is_wildcard && tok.contains(bad_char)) {
            return Err(SubjectError::InvalidToken(tok.to_owned()));
        }
        if tok == ">" && tokens.peek().is_some() {
            return Err(SubjectError::FullWildcardNotLast(s.to_owned()));
        }
    }
    Ok(())
}

/// Does `pattern` match the concrete `subject`? (both assumed valid)
pub fn matches(pattern: &str, subject: &str) -> bool {
    // A concrete subject is the degenerate pattern matching only itself, so
    // matching is containment of that singleton.
    contains(pattern, subject)
}

/// Containment: true iff every concrete subject matched by `inner` is also
/// matched by `outer`.
pub fn contains(outer: &str, inner: &str) -> bool {
    let (mut o, mut i) = (outer.split('.'), inner.split('.'));
    loop {
        match (o.next(), i.next()) {
            (None, None) => return true,
            // Inner has at least one token left, so whatever it still
            // matches is a non-empty remainder, which `>` absorbs: if `>`
            // is outer's last token. Anything after it makes outer
            // malformed, and a malformed grant grants nothing.
            (Some(">"), Some(_)) => return o.next().is_none(),
            // Inner `>` spans unboundedly many tokens; nothing but `>` covers
            // that (the previous arm already handled outer `>`).
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            // Outer is a literal here: it contains only the identical
            // literal, never an inner `*` (which matches other tokens too).
            (Some(a), Some(b)) if a == b => {}
            // Mismatched token, or lengths do not line up.
            _ => return false,
        }
    }
}

/// Do the two patterns match at least one common subject?
pub fn overlaps(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split('.'), b.split('.'));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            // The other side has a non-empty remainder; any valid non-empty
            // pattern matches some non-empty token sequence, which `>` takes.
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

/// Number of leading literal tokens, i.e. the index of the first wildcard.
fn literal_prefix_len(p: &str) -> usize {
    p.split('.').take_while(|t| *t != "*" && *t != ">").count()
}

/// Checks that `src` and `dest` are valid patterns of the shape
/// `literals ++ T` with the same wildcard tail `T`, and returns the two
/// literal-prefix lengths. Because the tails are identical, every wildcard
/// sits at the same offset from the end of the prefix on both sides, so
/// mapping is a pure prefix swap.
fn republish_prefixes(src: &str, dest: &str) -> Option<(usize, usize)> {
    validate_pattern(src).ok()?;
    validate_pattern(dest).ok()?;
    let (l1, l2) = (literal_prefix_len(src), literal_prefix_len(dest));
    src.split('.')
        .skip(l1)
        .eq(dest.split('.').skip(l2))
        .then_some((l1, l2))
}

/// Joins the first `prefix` tokens of `head` with `tail_of` minus its first
/// `skip` tokens. At least one side is non-empty because patterns are.
fn swap_prefix(head: &str, prefix: usize, tail_of: &str, skip: usize) -> String {
    let mut out = String::with_capacity(head.len() + tail_of.len());
    for tok in head
        .split('.')
        .take(prefix)
        .chain(tail_of.split('.').skip(skip))
    {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(tok);
    }
    out
}

/// Map a pattern through a JetStream RePublish `src -> dest`, where `src` is
/// `L1` literal tokens followed by a wildcard tail `T` and `dest` is `L2`
/// literal tokens followed by the same `T`. A pattern contained in `src` maps
/// to `dest`'s literals followed by the pattern's tokens after `L1`.
/// e.g. `map_prefix("events.orders.*", "events.>", "relay.events.>")
/// == Some("relay.events.orders.*")`.
///
/// Returns `None` if any input is invalid, the tails differ, or `pattern` is
/// not contained in `src`.
pub fn map_prefix(pattern: &str, src: &str, dest: &str) -> Option<String> {
    let (l1, l2) = republish_prefixes(src, dest)?;
    validate_pattern(pattern).ok()?;
    contains(src, pattern).then(|| swap_prefix(dest, l2, pattern, l1))
}

/// The inverse of [`map_prefix`] for a concrete subject received on `dest`:
/// `unmap_prefix("relay.events.orders.1", "events.>", "relay.events.>")
/// == Some("events.orders.1")`.
///
/// Returns `None` if any input is invalid, the tails differ, or `subject` is
/// not matched by `dest`.
pub fn unmap_prefix(subject: &str, src: &str, dest: &str) -> Option<String> {
    let (l1, l2) = republish_prefixes(src, dest)?;
    validate_subject(subject).ok()?;
    matches(dest, subject).then(|| swap_prefix(src, l1, subject, l2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::LazyLock;

    #[test]
    fn validation_accepts_good_input() {
        for p in ["a", "a.b.c", "*", ">", "a.*.>", "*.b", "a.*.c"] {
            assert_eq!(validate_pattern(p), Ok(()), "{p}");
        }
        for s in ["a", "a.b.c", "orders.1", "a-b_c.$JS.1"] {
            assert_eq!(validate_subject(s), Ok(()), "{s}");
        }
        assert_eq!(validate_subject(&"a".repeat(MAX_LEN)), Ok(()));
    }

    #[test]
    fn validation_rejects_bad_input() {
        use SubjectError::*;
        let cases: &[(&str, SubjectError)] = &[
            ("", Empty),
            ("a..b", EmptyToken("a..b".into())),
            (".a", EmptyToken(".a".into())),
            ("a.", EmptyToken("a.".into())),
            (".", EmptyToken(".".into())),
            ("a b", InvalidToken("a b".into())),
            ("a.b\tc", InvalidToken("b\tc".into())),
            ("x.a\r\n", InvalidToken("a\r\n".into())),
            ("a*", InvalidToken("a*".into())),
            ("a.b>", InvalidToken("b>".into())),
            ("**", InvalidToken("**".into())),
            ("a.>.b", FullWildcardNotLast("a.>.b".into())),
            (">.>", FullWildcardNotLast(">.>".into())),
            ("a.b\0c", InvalidToken("b\0c".into())),
            ("a.\x0cb", InvalidToken("\x0cb".into())),
            ("a.\x1b[31m", InvalidToken("\x1b[31m".into())),
            ("a.b\u{7f}", InvalidToken("b\u{7f}".into())),
            ("a.\u{FFFD}", NotText("a.\u{FFFD}".into())),
        ];
        for (p, err) in cases {
            assert_eq!(validate_pattern(p).as_ref(), Err(err), "{p:?}");
            assert_ne!(validate_subject(p), Ok(()), "{p:?}");
        }
        assert_eq!(validate_pattern(&"a".repeat(MAX_LEN + 1)), Err(TooLong));
        for s in ["*", ">", "a.*.>", "a.*", "a.>.b"] {
            assert!(matches!(validate_subject(s), Err(InvalidToken(_))), "{s}");
        }
        let msg = InvalidToken("a\nb".into()).to_string();
        assert!(msg.contains("\"a\\nb\""), "offending text quoted: {msg}");
    }

    /// Runs `f` over `(a, b)` pairs expecting `true` for `yes`, `false` for `no`.
    fn table(f: fn(&str, &str) -> bool, yes: &[(&str, &str)], no: &[(&str, &str)]) {
        for &(a, b) in yes {
            assert!(f(a, b), "expected true: {a:?} {b:?}");
        }
        for &(a, b) in no {
            assert!(!f(a, b), "expected false: {a:?} {b:?}");
        }
    }

    #[test]
    #[rustfmt::skip]
    fn matching() {
        let yes = [("a.b", "a.b"), ("a.*", "a.b"), ("*.b", "a.b"), (">", "a"), (">", "a.b.c"),
                   ("a.>", "a.b.c")];
        let no = [("a.>", "a"), ("a.*", "a"), ("a.*", "a.b.c"), ("a.b", "a.c"), ("a.b", "a.b.c"),
                  ("ab", "a"), ("a.b.c", "a.b")];
        table(matches, &yes, &no);
    }

    #[test]
    #[rustfmt::skip]
    fn containment() {
        let yes = [("orders.>", "orders.*"), ("a.*.c", "a.b.c"), ("*.b", "a.b"), (">", "a"),
                   (">", "*"), (">", ">"), (">", "a.*.>"), ("a.>", "a.b.>"), ("*.>", "a.*.>"),
                   ("a.>", "a.>")];
        let no = [("orders.*", "orders.>"), ("a.b.c", "a.*.c"), ("a.>", "a"), ("a.b.>", "a.>"),
                  ("*.*", "*.>"), ("a.*", "a.*.b"), ("a", "*"), ("*", "a.b")];
        table(contains, &yes, &no);
        // Malformed grants grant nothing.
        let malformed = [("events.>.x", "events.b.c.d"), ("events.>.", "events.b.c"),
                         ("events.>.>", "events.a.b"), (">.a", "x.a")];
        table(contains, &[], &malformed);
    }

    #[test]
    #[rustfmt::skip]
    fn overlapping() {
        let yes = [("a.*", "*.b"), ("a.>", "*.b.c"), (">", "x"), ("a.b", "a.b"), ("*.>", "a.b")];
        let no = [("a.*", "b.*"), ("a.>", "a"), ("a.*", "a.*.*"), ("a.b.>", "a.c.>"), ("*.>", "a")];
        table(overlaps, &yes, &no);
    }

    #[test]
    fn republish_mapping() {
        let (ev, rel) = ("events.>", "relay.events.>");
        let (evx, relx) = ("events.*.x", "relay.events.*.x");
        // (src, dest, pattern, expected mapping)
        let maps = [
            (ev, rel, "events.orders.*", Some("relay.events.orders.*")),
            (ev, rel, "events.>", Some(rel)),
            (ev, rel, "events", None),
            (ev, rel, "other.x", None),
            (ev, rel, ">", None),
            (ev, rel, "events..a", None),
            // Literals after the first wildcard; prefixes of any length.
            (evx, relx, "events.o.x", Some("relay.events.o.x")),
            (evx, relx, "events.o.y", None),
            (">", "r.>", "a.b", Some("r.a.b")),
            ("a.b", "c", "a.b", Some("c")),
            // Tails differ, or src invalid.
            (ev, "relay.*", "events.a", None),
            ("e.*.x", "r.*.y", "e.a.x", None),
            ("events.>.x", "relay.events.>.x", "events.a.x", None),
        ];
        for (src, dest, p, want) in maps {
            let got = map_prefix(p, src, dest);
            assert_eq!(got.as_deref(), want, "{p}: {src} -> {dest}");
        }
        // (src, dest, subject received on dest, expected original subject)
        let unmaps = [
            (ev, rel, "relay.events.orders.1", Some("events.orders.1")),
            (ev, rel, "relay.events", None),
            (ev, rel, "relay.other.x", None),
            (ev, rel, "relay.events.*", None),
            (evx, relx, "relay.events.o.x", Some("events.o.x")),
            ("r.>", ">", "a.b", Some("r.a.b")),
            (ev, "r.*", "r.a", None),
        ];
        for (src, dest, s, want) in unmaps {
            let got = unmap_prefix(s, src, dest);
            assert_eq!(got.as_deref(), want, "{s}: {src} -> {dest}");
        }
    }

    /// All token sequences of 1..=`max` tokens over `alphabet`, plus, if
    /// `full`, every shorter sequence (including none) followed by `>`.
    fn enumerate(alphabet: &[&str], max: usize, full: bool) -> Vec<String> {
        let join = |p: &str, t: &str| [p, t].join(".").trim_start_matches('.').to_owned();
        let (mut out, mut layer) = (Vec::new(), vec![String::new()]);
        for _ in 0..max {
            if full {
                out.extend(layer.iter().map(|p| join(p, ">")));
            }
            layer = layer
                .iter()
                .flat_map(|p| alphabet.iter().map(|t| join(p, t)))
                .collect();
            out.extend(layer.iter().cloned());
        }
        out
    }

    /// Every concrete subject over {a,b,c} with 1..=6 tokens (3+9+...+729).
    /// Generated patterns have at most 5 tokens, so each `>` pattern matches
    /// subjects of at least two lengths here; that is what makes brute-force
    /// containment over this finite set agree with the real relation.
    static ALL_SUBJECTS: LazyLock<Vec<String>> =
        LazyLock::new(|| enumerate(&["a", "b", "c"], 6, false));

    fn pattern() -> impl Strategy<Value = String> {
        let tok = prop::sample::select(vec!["a", "b", "c", "*"]);
        (prop::collection::vec(tok, 1..=5), any::<bool>()).prop_map(|(mut toks, full)| {
            if full {
                *toks.last_mut().unwrap() = ">";
            }
            toks.join(".")
        })
    }

    /// Any string over the subject alphabet plus separators and wildcards in
    /// any position: mostly malformed patterns, as a hostile token may carry.
    fn any_grant() -> impl Strategy<Value = String> {
        let ch = prop::sample::select(vec!["a", "b", ".", "*", ">", "", " "]);
        prop::collection::vec(ch, 0..=8).prop_map(|c| c.concat())
    }

    fn subject() -> impl Strategy<Value = String> {
        let tok = prop::sample::select(vec!["a", "b", "c"]);
        prop::collection::vec(tok, 1..=6).prop_map(|t| t.join("."))
    }

    /// RePublish configurations with matching tails, as `(src, dest)`.
    #[rustfmt::skip]
    const REPUBLISH: &[(&str, &str)] = &[(">", "r.>"), ("a.>", "r.s.>"), ("a.>", ">"),
        ("a.*", "r.*"), ("a.*.b", "r.*.b"), ("*.a", "r.s.*.a"), ("a.b", "c")];

    proptest! {
        #[test]
        fn generated_inputs_are_valid(p in pattern(), s in subject()) {
            prop_assert_eq!(validate_pattern(&p), Ok(()));
            prop_assert_eq!(validate_subject(&s), Ok(()));
            prop_assert!(matches(&p, &p.replace(['*', '>'], "a")));
        }

        #[test]
        fn contains_is_sound(outer in pattern(), inner in pattern(), s in subject()) {
            if contains(&outer, &inner) && matches(&inner, &s) {
                prop_assert!(matches(&outer, &s));
            }
        }

        #[test]
        fn contains_agrees_with_brute_force(outer in pattern(), inner in pattern()) {
            let brute = ALL_SUBJECTS.iter().all(|s| !matches(&inner, s) || matches(&outer, s));
            prop_assert_eq!(contains(&outer, &inner), brute);
        }

        #[test]
        fn malformed_grants_contain_nothing(outer in any_grant(), inner in pattern()) {
            if validate_pattern(&outer).is_err() {
                prop_assert!(!contains(&outer, &inner), "{:?} contains {:?}", outer, inner);
            } else {
                let brute = ALL_SUBJECTS.iter().all(|s| !matches(&inner, s) || matches(&outer, s));
                prop_assert_eq!(contains(&outer, &inner), brute);
            }
        }

        #[test]
        fn contains_is_reflexive_and_transitive(a in pattern(), b in pattern(), c in pattern()) {
            prop_assert!(contains(&a, &a));
            if contains(&a, &b) && contains(&b, &c) {
                prop_assert!(contains(&a, &c));
            }
        }

        #[test]
        fn overlaps_agrees_with_brute_force(a in pattern(), b in pattern()) {
            let brute = ALL_SUBJECTS.iter().any(|s| matches(&a, s) && matches(&b, s));
            prop_assert_eq!(overlaps(&a, &b), brute);
            prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
        }

        #[test]
        fn republish_round_trips(idx in 0..REPUBLISH.len(), p in pattern()) {
            let (src, dest) = REPUBLISH[idx];
            let mapped = map_prefix(&p, src, dest);
            prop_assert_eq!(mapped.is_some(), contains(src, &p));
            for s in ALL_SUBJECTS.iter().filter(|s| matches(src, s)) {
                let out = map_prefix(s, src, dest).expect("subject under src maps");
                prop_assert!(matches(dest, &out));
                prop_assert_eq!(unmap_prefix(&out, src, dest), Some(s.clone()));
                if let Some(m) = &mapped {
                    prop_assert_eq!(matches(m, &out), matches(&p, s), "{} -> {}", s, out);
                }
            }
        }
    }

    /// Exhaustive transitivity over all patterns of up to 3 tokens, since
    /// random triples rarely form a containment chain.
    #[test]
    fn contains_is_transitive_exhaustively() {
        let pats = enumerate(&["a", "b", "*"], 3, true);
        for a in &pats {
            for b in pats.iter().filter(|b| contains(a, b)) {
                for c in pats.iter().filter(|c| contains(b, c)) {
                    assert!(contains(a, c), "{a} contains {b} contains {c}");
                }
            }
        }
    }
}
