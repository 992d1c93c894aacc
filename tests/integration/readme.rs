//! The README shows files of the repository as code blocks: each block must be the file, so
//! what users copy is what the end-to-end tests run.

use std::path::Path;

/// The indented code block of `readme` whose first line is `first`, de-indented.
fn block_starting_with(readme: &str, first: &str) -> Option<String> {
    let mut lines = readme
        .lines()
        .skip_while(|line| *line != format!("    {first}"));
    lines.next()?;
    let mut block = vec![first.to_owned()];
    for line in lines {
        match line.strip_prefix("    ") {
            Some(code) => block.push(code.to_owned()),
            None if line.is_empty() => block.push(String::new()),
            None => break,
        }
    }
    while block.last().is_some_and(String::is_empty) {
        block.pop();
    }
    Some(block.join("\n") + "\n")
}

#[test]
fn the_readmes_systemd_unit_for_an_app_is_the_example_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let file = std::fs::read_to_string(root.join("examples/systemd/mybot.service")).unwrap();
    let first = file.lines().next().unwrap();
    let block = block_starting_with(&readme, first)
        .unwrap_or_else(|| panic!("no block starting with {first:?} in README.md"));
    assert_eq!(
        block, file,
        "README.md's block differs from examples/systemd/mybot.service"
    );
}
