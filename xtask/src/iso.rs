//! Bootable GRUB ISOs: the hypervisor as the Multiboot2 kernel and the guests as modules.
//!
//! The staging directory gets `boot/lamina-hv`, one `boot/m<N>-<name>.elf` per module (numbered,
//! so two modules built from the same file never collide) and `boot/grub/grub.cfg`; then
//! `grub-mkrescue` turns it into a BIOS-bootable ISO (El Torito, as QEMU and Bochs boot it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Context, Result, failed};

/// A guest (or any file) loaded by GRUB as a Multiboot2 module.
#[derive(Clone, Debug)]
pub struct BootModule {
    pub path: PathBuf,
    /// The module's command line: the domain name first, then `key=value` options.
    pub cmdline: String,
}

/// Characters GRUB's script parser would interpret inside a `multiboot2`/`module2` line.
const GRUB_SPECIAL_CHARS: &[char] = &['\n', '\r', '"', '\'', '$', ';', '{', '}', '\\', '|', '&'];

/// Checks that a command line can go into grub.cfg verbatim.
pub fn check_cmdline(cmdline: &str) -> Result<()> {
    match cmdline.chars().find(|c| GRUB_SPECIAL_CHARS.contains(c)) {
        Some(c) => Err(failed(format!(
            "command line {cmdline:?} contains {c:?}, which GRUB would interpret; use plain words"
        ))),
        None => Ok(()),
    }
}

/// The grub.cfg text. `modules` holds (file name under /boot, command line) pairs.
pub fn grub_config(hv_cmdline: &str, modules: &[(String, String)]) -> String {
    let mut config = String::from("set timeout=0\nset default=0\nmenuentry \"Lamina\" {\n");
    config.push_str(&join_words(&["  multiboot2 /boot/lamina-hv", hv_cmdline]));
    for (file_name, cmdline) in modules {
        config.push_str(&join_words(&[
            &format!("  module2 /boot/{file_name}"),
            cmdline,
        ]));
    }
    config.push_str("  boot\n}\n");
    config
}

/// `first rest\n`, without a trailing blank when `rest` is empty.
fn join_words(words: &[&str]) -> String {
    let mut line = words
        .iter()
        .map(|w| w.trim())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>();
    // Keep the indentation of the first word, which trim() removed.
    let indent = if words.first().is_some_and(|w| w.starts_with("  ")) {
        "  "
    } else {
        ""
    };
    if line.is_empty() {
        line.push("");
    }
    format!("{indent}{}\n", line.join(" "))
}

/// The file name a module gets under /boot: `m<index>-<name>.elf`, with `name` made of safe
/// characters only.
pub fn module_file_name(index: usize, source: &Path) -> String {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let safe: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("m{index}-{safe}.elf")
}

/// Writes `iso_path` from the staging directory `staging_dir` (recreated from scratch).
pub fn build_iso(
    hv: &Path,
    hv_cmdline: &str,
    modules: &[BootModule],
    staging_dir: &Path,
    iso_path: &Path,
) -> Result<()> {
    check_cmdline(hv_cmdline)?;
    for module in modules {
        check_cmdline(&module.cmdline)?;
    }
    if staging_dir.exists() {
        fs::remove_dir_all(staging_dir)
            .context(|| format!("removing old staging directory {}", staging_dir.display()))?;
    }
    let boot_dir = staging_dir.join("boot");
    let grub_dir = boot_dir.join("grub");
    fs::create_dir_all(&grub_dir).context(|| format!("creating {}", grub_dir.display()))?;

    copy(hv, &boot_dir.join("lamina-hv"))?;
    let mut entries = Vec::with_capacity(modules.len());
    for (index, module) in modules.iter().enumerate() {
        let file_name = module_file_name(index + 1, &module.path);
        copy(&module.path, &boot_dir.join(&file_name))?;
        entries.push((file_name, module.cmdline.clone()));
    }
    let config_path = grub_dir.join("grub.cfg");
    fs::write(&config_path, grub_config(hv_cmdline, &entries))
        .context(|| format!("writing {}", config_path.display()))?;

    if let Some(parent) = iso_path.parent() {
        fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    }
    let output = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(iso_path)
        .arg(staging_dir)
        .output()
        .context(|| "starting grub-mkrescue".to_string())?;
    if !output.status.success() || !iso_path.is_file() {
        return Err(failed(format!(
            "grub-mkrescue failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .context(|| format!("copying {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_config_lists_kernel_then_modules_in_order() {
        let modules = vec![
            ("m1-bad-elf.elf".to_string(), "bad-elf".to_string()),
            (
                "m2-sample-guest.elf".to_string(),
                "sample-guest mem=8M".to_string(),
            ),
        ];
        assert_eq!(
            grub_config("loglevel=debug", &modules),
            "set timeout=0\nset default=0\nmenuentry \"Lamina\" {\n  \
             multiboot2 /boot/lamina-hv loglevel=debug\n  \
             module2 /boot/m1-bad-elf.elf bad-elf\n  \
             module2 /boot/m2-sample-guest.elf sample-guest mem=8M\n  boot\n}\n"
        );
    }

    #[test]
    fn empty_hv_cmdline_leaves_no_trailing_blank() {
        assert!(grub_config("", &[]).contains("  multiboot2 /boot/lamina-hv\n"));
    }

    #[test]
    fn module_names_are_numbered_and_sanitised() {
        assert_eq!(
            module_file_name(3, Path::new("/x/my guest.elf")),
            "m3-my_guest.elf"
        );
        assert_eq!(
            module_file_name(1, Path::new("sample-guest")),
            "m1-sample-guest.elf"
        );
    }

    #[test]
    fn cmdlines_with_grub_syntax_are_refused() {
        assert!(check_cmdline("sample-guest mem=8M").is_ok());
        assert!(check_cmdline("a; reboot").is_err());
        assert!(check_cmdline("a\nb").is_err());
    }
}
