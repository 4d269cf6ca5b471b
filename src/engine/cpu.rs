//! What this CPU and its operating system let the runtime use, and which of ggml's CPU builds
//! ("variants") to load for it.
//!
//! Detection reads CPUID and XCR0 and asks Linux for the AMX tile permission; the AMX verdict also
//! needs a tile instruction to run in a throw-away child process, so a CPU that advertises AMX
//! without the hypervisor or kernel enabling it is never handed the AMX build. The choice itself
//! ([`choose_variant`]) is a pure function over (variant, score) pairs, unit-tested without a CPU.

use std::fmt;

/// The instruction-set facts the choice depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub avx2: bool,
    pub avx512f: bool,
    pub avx512_vnni: bool,
    pub avx512_bf16: bool,
    /// CPUID leaf 7 advertises AMX-TILE and AMX-INT8.
    pub amx_cpuid: bool,
    /// XCR0 has the tile configuration and tile data state enabled (bits 17 and 18).
    pub amx_xcr0: bool,
    /// Linux granted this process the tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM).
    pub amx_permission: bool,
    /// A tile configuration load, tile zero and tile release ran in a child process.
    pub amx_runs: bool,
}

impl Features {
    /// Whether AMX is proven usable: advertised, enabled by the OS, permitted and executed.
    pub fn amx_usable(&self) -> bool {
        self.amx_cpuid && self.amx_xcr0 && self.amx_permission && self.amx_runs
    }

    /// Why AMX is or is not used, in one clause.
    pub fn amx_verdict(&self) -> &'static str {
        if !self.amx_cpuid {
            "the CPU does not advertise AMX"
        } else if !self.amx_xcr0 {
            "the CPU advertises AMX but XCR0 lacks the tile state (the OS or hypervisor does not enable it)"
        } else if !self.amx_permission {
            "Linux refused the AMX tile permission (arch_prctl ARCH_REQ_XCOMP_PERM)"
        } else if !self.amx_runs {
            "a tile instruction faulted in the probe process"
        } else {
            "AMX advertised, enabled, permitted and a tile instruction ran"
        }
    }

    /// Detects this CPU (x86-64 Linux; elsewhere every field is false).
    pub fn detect() -> Self {
        imp::detect()
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "AVX2 {}, AVX-512F {}, AVX-512 VNNI {}, AVX-512 BF16 {}, AMX {} ({})",
            yn(self.avx2),
            yn(self.avx512f),
            yn(self.avx512_vnni),
            yn(self.avx512_bf16),
            yn(self.amx_usable()),
            self.amx_verdict()
        )
    }
}

/// Whether a ggml CPU variant uses AMX tiles (its name, as ggml's CMake names them).
pub fn variant_uses_amx(name: &str) -> bool {
    name.contains("sapphirerapids") || name.contains("amx")
}

/// The variant chosen and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub name: String,
    pub reason: String,
}

/// Picks the variant with the highest ggml score (0 = cannot run on this CPU), skipping the AMX
/// ones unless `amx_usable`; ties go to the first listed. `None` when no variant can run.
pub fn choose_variant(scored: &[(String, i32)], amx_usable: bool) -> Option<Choice> {
    let mut skipped_amx = None;
    let mut best: Option<&(String, i32)> = None;
    for v in scored {
        if v.1 <= 0 {
            continue;
        }
        if variant_uses_amx(&v.0) && !amx_usable {
            skipped_amx = Some(v.0.clone());
            continue;
        }
        if best.is_none_or(|b| v.1 > b.1) {
            best = Some(v);
        }
    }
    let (name, score) = best?;
    let mut reason = format!(
        "highest ggml score ({score}) of the {} variants that run on this CPU",
        scored.iter().filter(|v| v.1 > 0).count()
    );
    if let Some(amx) = skipped_amx {
        reason.push_str(&format!("; {amx} skipped: AMX is not proven usable"));
    }
    Some(Choice {
        name: name.clone(),
        reason,
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::Features;
    use std::arch::x86_64::__cpuid_count;

    const ARCH_REQ_XCOMP_PERM: libc::c_int = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    pub fn detect() -> Features {
        // CPUID is always available on x86-64.
        let l1 = __cpuid_count(1, 0);
        let l7 = __cpuid_count(7, 0);
        let l7_1 = __cpuid_count(7, 1);
        let osxsave = l1.ecx & (1 << 27) != 0;
        let xcr0 = if osxsave { xgetbv0() } else { 0 };
        // AVX state (bits 1, 2) and AVX-512 state (bits 5, 6, 7) must be enabled by the OS too.
        let avx_os = xcr0 & 0x6 == 0x6;
        let avx512_os = avx_os && xcr0 & 0xe0 == 0xe0;
        let avx512f = avx512_os && l7.ebx & (1 << 16) != 0;
        let amx_cpuid = l7.edx & (1 << 24) != 0 && l7.edx & (1 << 25) != 0;
        let amx_xcr0 = xcr0 & (0b11 << 17) == (0b11 << 17);
        // SAFETY: arch_prctl with an integer argument; a refusal is an error return.
        let amx_permission = amx_cpuid
            && amx_xcr0
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0;
        let amx_runs = amx_permission && tile_probe();
        Features {
            avx2: avx_os && l7.ebx & (1 << 5) != 0,
            avx512f,
            avx512_vnni: avx512f && l7.ecx & (1 << 11) != 0,
            avx512_bf16: avx512f && l7_1.eax & (1 << 5) != 0,
            amx_cpuid,
            amx_xcr0,
            amx_permission,
            amx_runs,
        }
    }

    fn xgetbv0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 is valid whenever CPUID reports OSXSAVE (checked by caller).
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Runs LDTILECFG, TILEZERO and TILERELEASE in a forked child; true when it exits cleanly.
    fn tile_probe() -> bool {
        // Palette 1, tile 0: 16 rows of 64 bytes.
        #[repr(C, align(64))]
        struct Cfg([u8; 64]);
        let mut cfg = Cfg([0; 64]);
        cfg.0[0] = 1;
        cfg.0[16] = 64; // colsb[0] (u16 little endian)
        cfg.0[48] = 16; // rows[0]
                        // SAFETY: the child only runs the three instructions and _exit (async-signal-safe), so
                        // forking a multi-threaded process is fine; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            if pid < 0 {
                return false;
            }
            if pid == 0 {
                std::arch::asm!(
                    ".byte 0xc4, 0xe2, 0x78, 0x49, 0x00", // ldtilecfg [rax]
                    ".byte 0xc4, 0xe2, 0x7b, 0x49, 0xc0", // tilezero tmm0
                    ".byte 0xc4, 0xe2, 0x78, 0x49, 0xc0", // tilerelease
                    in("rax") cfg.0.as_ptr(),
                    options(nostack),
                );
                libc::_exit(0);
            }
            let mut status = 0;
            if libc::waitpid(pid, &mut status, 0) != pid {
                return false;
            }
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub fn detect() -> super::Features {
        super::Features::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[(&str, i32)]) -> Vec<(String, i32)> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn highest_runnable_score_wins() {
        let c = choose_variant(
            &v(&[("x64", 1), ("haswell", 55), ("icelake", 1900), ("zen4", 0)]),
            false,
        )
        .unwrap();
        assert_eq!(c.name, "icelake");
        assert!(c.reason.contains("3 variants"), "{}", c.reason);
    }

    #[test]
    fn amx_variant_needs_the_probe() {
        let list = v(&[("haswell", 55), ("icelake", 1900), ("sapphirerapids", 3948)]);
        let c = choose_variant(&list, false).unwrap();
        assert_eq!(c.name, "icelake");
        assert!(c.reason.contains("sapphirerapids skipped"), "{}", c.reason);
        assert_eq!(choose_variant(&list, true).unwrap().name, "sapphirerapids");
    }

    #[test]
    fn nothing_runnable_is_none() {
        assert_eq!(
            choose_variant(&v(&[("zen4", 0), ("sapphirerapids", 0)]), true),
            None
        );
        assert_eq!(choose_variant(&[], true), None);
        // only an AMX build scores, and AMX is not proven: nothing to load
        assert_eq!(choose_variant(&v(&[("sapphirerapids", 9)]), false), None);
    }

    #[test]
    fn ties_keep_the_first() {
        let c = choose_variant(&v(&[("a", 5), ("b", 5)]), false).unwrap();
        assert_eq!(c.name, "a");
    }

    #[test]
    fn amx_verdicts_name_the_missing_step() {
        let mut f = Features::default();
        assert!(f.amx_verdict().contains("does not advertise"));
        f.amx_cpuid = true;
        assert!(f.amx_verdict().contains("XCR0"));
        f.amx_xcr0 = true;
        assert!(f.amx_verdict().contains("permission"));
        f.amx_permission = true;
        assert!(f.amx_verdict().contains("faulted"));
        f.amx_runs = true;
        assert!(f.amx_usable());
    }

    #[test]
    fn detection_is_consistent() {
        let f = Features::detect();
        // AVX-512 implies AVX2 on every CPU that has it; AMX usable implies each step.
        assert!(!f.avx512f || f.avx2);
        assert!(!f.amx_runs || (f.amx_cpuid && f.amx_xcr0 && f.amx_permission));
    }
}
