//! Property tests of the spec parser: no input makes it panic or hang, and
//! every error it reports is located (the source, and for anything but the
//! input as a whole, the document and its line).

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{SpecErrors, parse_documents};

/// Longest a parse of one input of these sizes may take (a debug build on a
/// busy machine): anything near it is a hang in the making.
const SLOW: Duration = Duration::from_secs(2);

/// Pieces of YAML that a spec (or an attack on its parser) is made of.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "labels",
    "spec",
    "replicas",
    "command",
    "args",
    "image",
    "env",
    "ports",
    "containerPort",
    "protocol",
    "placement",
    "mode",
    "providers",
    "weight",
    "selector",
    "health",
    "http",
    "path",
    "port",
    "interval",
    "failover",
    "routing",
    "listen",
    "driver",
    "docker",
    "ec2",
    "kubernetes",
    "unknownField",
    "? complex",
    "- name",
    "-",
    "<<",
];

const VALUES: &[&str] = &[
    "skymirror.dev/v1",
    "App",
    "Provider",
    "web",
    "aws",
    "process",
    "mirror",
    "spread",
    "3",
    "-1",
    "4294967296",
    "1e999",
    "0x10",
    "2s",
    "500ms",
    "1m30s",
    "99999999999h",
    "true",
    "~",
    "\"quoted \\u0000 nul\"",
    "'single'",
    "[a, b, [c]]",
    "{a: 1, b: {c: 2}}",
    "&anchor value",
    "*anchor",
    "*undefined",
    "!!binary aGVsbG8=",
    "!custom tag",
    "|",
    ">-",
    "\"unterminated",
    "'",
    "%YAML 1.2",
    "@",
    "\t tab",
    "\u{feff}bom",
    "ünïcödé",
    "\u{1b}[31m",
    "",
];

/// A line of YAML-ish text: indentation, a key, a value, or a marker.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0usize..8, prop::sample::select(KEYS), prop::sample::select(VALUES))
            .prop_map(|(indent, k, v)| format!("{}{k}: {v}", " ".repeat(indent))),
        1 => (0usize..8, prop::sample::select(VALUES))
            .prop_map(|(indent, v)| format!("{}- {v}", " ".repeat(indent))),
        1 => prop::sample::select(&["---", "...", "#comment", "", "  ", "- - -", "[", "{", "]", "}"][..])
            .prop_map(str::to_string),
        1 => "[ -~]{0,40}",
    ]
}

/// YAML-ish documents: mostly lines of spec keys and values.
fn yamlish() -> impl Strategy<Value = String> {
    prop::collection::vec(line(), 0..60).prop_map(|lines| lines.join("\n"))
}

/// Parses `text` and checks the properties; returns what it found.
fn check(text: &str) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let result = parse_documents("input.yaml", text);
    let took = started.elapsed();
    prop_assert!(took < SLOW, "parsing took {took:?}");
    if let Err(SpecErrors(errors)) = result {
        prop_assert!(!errors.is_empty(), "an error result names its errors");
        for e in &errors {
            prop_assert_eq!(&e.source, "input.yaml");
            prop_assert!(!e.message.is_empty(), "{:?}", e);
            let whole = e.message == "no documents" || e.message.contains("limit");
            if !whole {
                prop_assert!(
                    e.document.is_some() && e.line.is_some(),
                    "an error without a place: {}",
                    e
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_parsed_or_refused_with_located_errors(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn yaml_like_text_is_parsed_or_refused_with_located_errors(text in yamlish()) {
        check(&text)?;
    }

    #[test]
    fn a_valid_app_with_one_bad_value_is_refused_at_its_line(
        value in prop::sample::select(VALUES),
        field in prop::sample::select(&["replicas", "command", "mode", "interval"][..]),
    ) {
        let text = "apiVersion: skymirror.dev/v1\nkind: App\nmetadata:\n  name: web\nspec:\n  command: x\n  replicas: 1\n  health:\n    tcp: {port: http}\n    interval: 2s\n  ports: [{name: http}]\n  placement:\n    mode: mirror\n"
        .replace(&format!("{field}: "), &format!("{field}: {value} #"));
        check(&text)?;
    }
}

#[test]
fn alias_bombs_and_deep_nesting_end_quickly() {
    let laughs = {
        let mut t = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let mut prev = "a";
        for n in names {
            t.push_str(&format!("{n}: &{n} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
            prev = n;
        }
        t
    };
    for (what, text) in [
        ("a billion laughs", laughs),
        ("deep flow nesting", "[".repeat(100_000)),
        (
            "deep flow nesting in a value",
            format!("a: {}", "[".repeat(100_000)),
        ),
        (
            "deep mapping nesting",
            format!("a: {}", "{a: ".repeat(50_000)),
        ),
        (
            "deep block nesting",
            (0..2000)
                .map(|i| format!("{}- a\n", " ".repeat(i)))
                .collect(),
        ),
        ("many documents", "---\na: 1\n".repeat(5000)),
    ] {
        let started = Instant::now();
        let result = parse_documents("bomb.yaml", &text);
        assert!(
            started.elapsed() < SLOW,
            "{what} took {:?}",
            started.elapsed()
        );
        assert!(result.is_err(), "{what} is not a spec");
    }
    let err = parse_documents(
        "deep.yaml",
        &format!("kind: App\nspec:\n  args: {}", "[".repeat(65)),
    )
    .expect_err("too deep");
    assert_eq!(
        err.to_string(),
        "deep.yaml: document 1, line 3, column 73: collections nest deeper than 64 levels"
    );
    // Brackets in quotes, comments and block scalars are text.
    let text = format!(
        "apiVersion: skymirror.dev/v1\nkind: App\nmetadata: {{name: web}}\nspec:\n  command: sh\n  args: [\"-c\", \"{}\"] # {}\n  replicas: 1\n  env:\n    SCRIPT: |\n      {}\n",
        "[".repeat(100),
        "{".repeat(100),
        "[ -f x ] && [[[[".repeat(30)
    );
    parse_documents("fine.yaml", &text).expect("brackets in text are text");
}
