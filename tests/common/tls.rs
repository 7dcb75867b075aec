//! Certificates made by a test with the `openssl` command: a private CA and a server certificate it
//! signs for the names given (DNS names or IP addresses), in a temporary directory of the test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and one server certificate it signed, as PEM files.
pub struct TestCa {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    ca_key: PathBuf,
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("cannot run openssl (install it)");
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    /// A new CA named `name` in `dir`, and a server certificate for `names` signed by it.
    pub fn new(dir: &Path, name: &str, names: &[&str]) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let file = |suffix: &str| dir.join(format!("{name}-{suffix}"));
        let ca = TestCa {
            ca_cert: file("ca.crt"),
            ca_key: file("ca.key"),
            cert: file("server.crt"),
            key: file("server.key"),
            dir: dir.to_path_buf(),
        };
        let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
        let subject = format!("/CN={name} test CA");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &subject,
                "-keyout",
                &s(&ca.ca_key),
                "-out",
                &s(&ca.ca_cert),
            ],
        );
        ca.issue(names, &ca.cert, &ca.key);
        ca
    }

    /// Another server certificate for `names`, signed by this CA, written to `cert` and `key`.
    pub fn issue(&self, names: &[&str], cert: &Path, key: &Path) {
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let csr = self.dir.join(format!("{}.csr", cert.file_name().unwrap().to_str().unwrap()));
        let ext = self.dir.join(format!("{}.ext", cert.file_name().unwrap().to_str().unwrap()));
        let san: Vec<String> = names
            .iter()
            .map(|n| if n.parse::<std::net::IpAddr>().is_ok() { format!("IP:{n}") } else { format!("DNS:{n}") })
            .collect();
        std::fs::write(&ext, format!("subjectAltName={}\nbasicConstraints=CA:FALSE\n", san.join(","))).unwrap();
        let subject = format!("/CN={}", names[0]);
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &subject,
                "-keyout",
                &s(key),
                "-out",
                &s(&csr),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&self.ca_cert),
                "-CAkey",
                &s(&self.ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&ext),
                "-out",
                &s(cert),
            ],
        );
    }
}
