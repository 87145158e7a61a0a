//! The example configuration file and the README's table against the declared settings: an
//! operator who copies the example, uncomments a line or looks a variable up in the README
//! finds every setting, and each works.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kas_gateway::config::{self, Config, Settings};

const EXAMPLE: &str = include_str!("../packaging/kas-gateway.toml");

/// The example's lines that set a key, with the key: `key = value`, or `# key = value`
/// commented out.
fn key_lines(commented: bool) -> Vec<(String, String)> {
    EXAMPLE
        .lines()
        .filter_map(|line| {
            let line = if commented {
                line.strip_prefix("# ")?
            } else {
                line
            };
            let (key, _) = line.split_once(" = ")?;
            let is_key = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            is_key.then(|| (key.to_owned(), line.to_owned()))
        })
        .collect()
}

#[test]
fn the_example_file_loads_and_holds_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kas-gateway.toml");
    let example = Config::from_layers(Settings::default(), config::read_file(&path).unwrap())
        .expect("the example resolves");
    assert_eq!(example.data_dir, PathBuf::from("/var/lib/kas-gateway"));
    // Apart from its data directory, the example says what the defaults are.
    let defaults = Config::from_layers(
        Settings {
            data_dir: Some("/var/lib/kas-gateway".into()),
            ..Settings::default()
        },
        Settings::default(),
    )
    .unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn the_example_file_has_every_key() {
    let present: Vec<String> = key_lines(false)
        .into_iter()
        .chain(key_lines(true))
        .map(|(key, _)| key)
        .collect();
    let keys = config::file_keys();
    assert!(keys.contains(&"observability_listen".to_owned()));
    for key in &keys {
        assert!(
            present.contains(key),
            "{key} is not in packaging/kas-gateway.toml"
        );
    }
    for key in &present {
        assert!(keys.contains(key), "{key} is not a setting");
    }
}

#[test]
fn each_commented_out_line_works_alone() {
    let commented = key_lines(true);
    assert!(commented.len() >= 10, "{commented:?}");
    for (key, line) in commented {
        config::parse_file(&line).unwrap_or_else(|error| panic!("{key}: {error:#}"));
    }
}

#[test]
fn the_readme_table_lists_every_variable() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Configuration\n")
        .expect("a Configuration section");
    let section = &readme[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let table: String = section
        .lines()
        .filter(|line| line.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    for variable in config::environment_variables() {
        assert!(
            table.contains(&format!("`{variable}`")),
            "{variable} is not in the README's configuration table"
        );
    }
    assert!(section.contains("packaging/kas-gateway.toml"));
}
