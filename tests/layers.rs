//! The layers of ARCHITECTURE.md hold in the code: no module uses a module above it. The order is the
//! `<!-- layers -->` line of ARCHITECTURE.md; each `crate::<module>` path in a source file outside its
//! `#[cfg(test)] mod tests` must name a module before the file's own in that line.

use std::path::{Path, PathBuf};

fn layers() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let start = text.find("<!-- layers -->").expect("ARCHITECTURE.md has no <!-- layers --> line") + 15;
    let end = start + text[start..].find("<!-- /layers -->").expect("the layers line is not closed");
    text[start..end].split_whitespace().map(|w| w.trim_matches('`').to_string()).collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module of a source file (`src/log/writer.rs` → `log`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
    first.trim_end_matches(".rs").to_string()
}

/// The modules a source text names as `crate::<module>`, outside its unit tests.
fn used_modules(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + 7..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
        if !name.is_empty() && !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

#[test]
fn no_module_uses_a_module_above_it() {
    let order = layers();
    assert!(order.len() > 5, "the layers line lists too few modules: {order:?}");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut upward = Vec::new();
    let mut unlisted = Vec::new();
    for file in &files {
        let me = module_of(&src, file);
        if me == "main" || me == "lib" {
            continue;
        }
        let Some(my_rank) = order.iter().position(|m| *m == me) else {
            unlisted.push(me);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for used in used_modules(&text) {
            match order.iter().position(|m| *m == used) {
                Some(rank) if rank > my_rank => upward.push(format!("{} uses crate::{used}", file.display())),
                Some(_) => {}
                None if used == me => {}
                None => unlisted.push(used),
            }
        }
    }
    unlisted.sort();
    unlisted.dedup();
    assert!(unlisted.is_empty(), "modules missing from ARCHITECTURE.md's layers line: {unlisted:?}");
    assert!(upward.is_empty(), "uses that point up the layers:\n{}", upward.join("\n"));
}

#[test]
fn the_check_sees_a_use_that_points_up() {
    let order = layers();
    let text =
        "use crate::server::AppState;\nfn f() { crate::log::x(); }\n#[cfg(test)]\nmod tests { use crate::main; }";
    assert_eq!(used_modules(text), vec!["server".to_string(), "log".to_string()]);
    let rank = |m: &str| order.iter().position(|x| x == m).unwrap();
    assert!(rank("server") > rank("store"), "a store file naming crate::server would be reported");
}

/// The sibling modules a file of `src/<dir>/` names (`super::<sibling>`, `crate::<dir>::<sibling>`),
/// outside its unit tests.
fn sibling_uses(text: &str, dir: &str, siblings: &[String]) -> Vec<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut found = Vec::new();
    for prefix in ["super::".to_string(), format!("crate::{dir}::")] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix.as_str()) {
            rest = &rest[at + prefix.len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            let whole = rest[name.len()..].starts_with("::") || rest[name.len()..].starts_with([',', ';', '}', ' ']);
            if whole && siblings.contains(&name) && !found.contains(&name) {
                found.push(name);
            }
        }
    }
    found
}

/// A circle in `edges` (module → modules it uses), if there is one, as the path that closes it.
fn find_circle(edges: &std::collections::BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &std::collections::BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    edges.keys().find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_submodules_of_each_module_use_each_other_without_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut circles = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        if dir == src {
            continue; // the top level: the layers line above
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let stem = |p: &Path| p.file_stem().unwrap().to_str().unwrap().to_string();
        let siblings: Vec<String> = files.iter().map(|f| stem(f)).filter(|s| s != "mod").collect();
        let mut edges = std::collections::BTreeMap::new();
        for file in files.iter().filter(|f| stem(f) != "mod") {
            let text = std::fs::read_to_string(file).unwrap();
            let uses = sibling_uses(&text, &name, &siblings).into_iter().filter(|u| *u != stem(file)).collect();
            edges.insert(stem(file), uses);
        }
        if let Some(circle) = find_circle(&edges) {
            circles.push(format!("{}: {}", dir.display(), circle.join(" → ")));
        }
    }
    assert!(circles.is_empty(), "submodules that use each other in a circle:\n{}", circles.join("\n"));
}

#[test]
fn the_circle_check_sees_a_circle_and_a_use_of_a_sibling() {
    let siblings = vec!["console".to_string(), "routes".to_string(), "error".to_string()];
    let text = "use super::routes::authorize;\nuse super::AppState;\nuse crate::server::error::ApiError;\n";
    assert_eq!(sibling_uses(text, "server", &siblings), vec!["routes".to_string(), "error".to_string()]);
    let mut edges = std::collections::BTreeMap::new();
    edges.insert("console".to_string(), vec!["routes".to_string(), "error".to_string()]);
    edges.insert("routes".to_string(), vec!["error".to_string()]);
    edges.insert("error".to_string(), vec![]);
    assert_eq!(find_circle(&edges), None);
    edges.insert("routes".to_string(), vec!["console".to_string()]);
    assert_eq!(find_circle(&edges), Some(vec!["console".to_string(), "routes".to_string(), "console".to_string()]));
}
