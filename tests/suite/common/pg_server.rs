//! `PgServer`: a private Postgres 15 for tests that stop, restart or
//! reconfigure the server (TLS, failover), on a free loopback port, in a
//! temporary directory removed on drop; and `Ca`, a throwaway certificate
//! authority (rcgen) for its TLS certificates.
//!
//! How it runs: initdb and the server refuse to run as root, so when the
//! tests run as root every binary goes through `runuser -u postgres --`
//! and the directory is chowned to `postgres` first (as another user they
//! run directly). `initdb -A trust -U postgres --no-sync` takes well under a
//! second; the server listens on 127.0.0.1 only, puts its Unix socket in the
//! directory, and runs with fsync off (a crash here is a process crash, the
//! page cache survives it). `pg_ctl -w` waits until it accepts connections.
//! Binaries come from `HERALD_TEST_PG_BIN`, else /usr/lib/postgresql/15/bin.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How `pg_ctl` stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Sessions are ended, then a shutdown checkpoint (`-m fast`).
    Fast,
    /// The postmaster and its children quit at once, as in a crash; the
    /// next start runs crash recovery (`-m immediate`).
    Immediate,
}

impl StopMode {
    /// The `pg_ctl -m` value.
    pub fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A throwaway CA that issues server certificates.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate in a file of the test's own (for `sslrootcert`).
    pub fn pem_file(&self) -> PathBuf {
        super::temp_file("root.crt", &self.pem())
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its
    /// key, PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].as_str());
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Server options for [`PgServer::start_with`].
#[derive(Default)]
pub struct PgOptions<'a> {
    /// `ssl = on` with a certificate `ca` issues for these names.
    pub tls: Option<(&'a Ca, &'a [&'a str])>,
}

/// A private Postgres server; stopped and removed on drop.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    running: bool,
}

fn bin(name: &str) -> PathBuf {
    let dir =
        std::env::var("HERALD_TEST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(name)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program args…`, as `postgres` when we are root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hand `path` to the `postgres` user (when we are root), with `mode`.
fn give(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no `postgres` user to run the private server as"
    );
    // SAFETY: non-null result of getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl PgServer {
    /// A plain (no TLS) server, started.
    pub fn start() -> PgServer {
        PgServer::start_with(PgOptions::default())
    }

    /// A server with TLS on, its certificate issued by `ca` for `names`.
    pub fn start_tls(ca: &Ca, names: &[&str]) -> PgServer {
        PgServer::start_with(PgOptions {
            tls: Some((ca, names)),
        })
    }

    pub fn start_with(options: PgOptions<'_>) -> PgServer {
        let dir = std::env::temp_dir().join(format!(
            "herald-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        give(&dir, 0o700);
        let data = dir.join("data");
        let mut initdb = as_postgres(&bin("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run(initdb, "initdb");
        let port = super::free_port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 100\nlogging_collector = off\n",
            dir.display()
        );
        if let Some((ca, names)) = options.tls {
            let (cert, key) = ca.issue(names);
            for (name, text, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
                let path = data.join(name);
                std::fs::write(&path, text).unwrap();
                give(&path, mode);
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
        let mut server = PgServer {
            port,
            dir,
            running: false,
        };
        server.start_again();
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        self.url_on("127.0.0.1", db)
    }

    /// The URL with `host` (e.g. `localhost`) in place of 127.0.0.1.
    pub fn url_on(&self, host: &str, db: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}", self.port)
    }

    /// Run `sql` on the `postgres` database, without TLS.
    pub async fn admin(&self, sql: &str) {
        let (client, conn) = tokio_postgres::connect(
            &format!("{}?sslmode=disable", self.url("postgres")),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connecting to the private server");
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
    }

    /// A new, empty database on this server.
    pub async fn create_database(&self, name: &str) {
        self.admin(&format!("CREATE DATABASE {name}")).await;
    }

    fn pg_ctl(&self, args: &[&str], what: &str) {
        let mut cmd = as_postgres(&bin("pg_ctl"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(args);
        run(cmd, what);
    }

    /// Replace `pg_hba.conf` with `hba` and reload the server.
    pub fn set_hba(&self, hba: &str) {
        let path = self.dir.join("data").join("pg_hba.conf");
        std::fs::write(&path, hba).unwrap();
        give(&path, 0o600);
        self.pg_ctl(&["reload"], "pg_ctl reload");
    }

    /// Stop the server; sessions see their connections end.
    pub fn stop(&mut self, mode: StopMode) {
        if self.running {
            self.pg_ctl(&["-w", "-m", mode.arg(), "stop"], "pg_ctl stop");
            self.running = false;
        }
    }

    /// Start the stopped server on the same port; returns when it accepts
    /// connections.
    pub fn start_again(&mut self) {
        if !self.running {
            self.pg_ctl(&["-w", "-t", "60", "start"], "pg_ctl start");
            self.running = true;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private server does not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop with `mode` and start again.
    pub fn restart(&mut self, mode: StopMode) {
        self.stop(mode);
        self.start_again();
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let mut cmd = as_postgres(&bin("pg_ctl"));
            cmd.arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-m", "immediate", "stop"]);
            let _ = cmd.output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
