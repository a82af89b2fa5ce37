//! The CLI crate's modules import one way (CLI -> image store -> VM config ->
//! VMM): no module of `src/` reaches, through `crate::` paths, a module that
//! reaches it back. A cheap textual check of `crate::NAME` references (comments
//! skipped), run with the unit tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level modules of `src/` and the top-level modules each one names.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let (name, files) = if path.is_dir() {
            let files: Vec<_> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .collect();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                files,
            )
        } else if path.extension().is_some_and(|e| e == "rs") {
            (
                path.file_stem().unwrap().to_string_lossy().into_owned(),
                vec![path],
            )
        } else {
            continue;
        };
        if name == "bin" || name == "main" {
            continue;
        }
        let mut deps = BTreeSet::new();
        for file in files {
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let code = line.split("//").next().unwrap_or("");
                let mut rest = code;
                while let Some(i) = rest.find("crate::") {
                    rest = &rest[i + "crate::".len()..];
                    if let Some(group) = rest.strip_prefix('{') {
                        let end = group.find('}').unwrap_or(group.len());
                        for item in group[..end].split(',') {
                            deps.insert(ident(item.trim()));
                        }
                    } else {
                        deps.insert(ident(rest));
                    }
                }
            }
        }
        deps.remove(&name);
        modules.insert(name, deps);
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    for deps in modules.values_mut() {
        deps.retain(|d| names.contains(d));
    }
    modules
}

fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// A path from `from` back to `to` through `graph`, if there is one.
fn path_back(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if from == to {
        return Some(vec![to.to_owned()]);
    }
    if !seen.insert(from.to_owned()) {
        return None;
    }
    for next in &graph[from] {
        if let Some(mut p) = path_back(graph, next, to, seen) {
            p.insert(0, from.to_owned());
            return Some(p);
        }
    }
    None
}

#[test]
fn no_module_of_src_imports_in_a_circle() {
    let graph = imports(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.contains_key("run") && graph["run"].contains("container"));
    for (module, deps) in &graph {
        for dep in deps {
            if let Some(back) = path_back(&graph, dep, module, &mut BTreeSet::new()) {
                panic!(
                    "{module} imports in a circle: {module} -> {}",
                    back.join(" -> ")
                );
            }
        }
    }
}

#[test]
fn the_check_sees_a_circle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    let back = path_back(&graph, "b", "a", &mut BTreeSet::new());
    assert_eq!(back, Some(vec!["b".to_owned(), "a".to_owned()]));
}
