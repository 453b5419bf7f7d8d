//! A private PgBouncer in front of one test's database, for the tests of
//! `pgbouncer`: two aliases of that database, [`TRANSACTION`] and
//! [`SESSION`], pooled per transaction and per session over a few server
//! connections, so that clients really share them.
//!
//! PgBouncer refuses to run as root: as root it is started with
//! `-u postgres` (it drops to that user itself, so the child we hold is
//! PgBouncer and killing it stops it), its files in a directory owned by
//! `postgres`; as any other user it runs as that user.

use std::process::Stdio;
use std::time::{Duration, Instant};

use herald::Config;

/// The alias pooled per transaction.
pub const TRANSACTION: &str = "bouncer_tx";
/// The alias pooled per session.
pub const SESSION: &str = "bouncer_session";
/// Server connections per alias (`default_pool_size`).
pub const POOL_SIZE: usize = 3;

/// The settings the tests use, as docs/pgbouncer.md shows them: `options`
/// (Herald's startup `-c TimeZone=UTC ...`) is ignored, since PgBouncer
/// 1.18 refuses a client that sends it.
pub fn ini(port: u16, dir: &std::path::Path, database: &str, server_port: u16) -> String {
    format!(
        "[databases]\n\
         {TRANSACTION} = host=127.0.0.1 port={server_port} dbname={database} pool_mode=transaction\n\
         {SESSION} = host=127.0.0.1 port={server_port} dbname={database} pool_mode=session pool_size=80\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/users.txt\n\
         logfile = {dir}/pgbouncer.log\n\
         pidfile = {dir}/pgbouncer.pid\n\
         default_pool_size = {POOL_SIZE}\n\
         max_client_conn = 500\n\
         ignore_startup_parameters = options\n",
        dir = dir.display(),
    )
}

pub struct PgBouncer {
    pub port: u16,
    pub dir: std::path::PathBuf,
    child: std::process::Child,
}

impl PgBouncer {
    /// PgBouncer on a free loopback port in front of `database` on the
    /// Postgres of the tests; returns once it accepts connections.
    pub fn start(database: &str) -> PgBouncer {
        PgBouncer::start_with(database, |ini| ini)
    }

    /// [`start`](Self::start) with `edit` applied to the ini text.
    pub fn start_with(database: &str, edit: impl FnOnce(String) -> String) -> PgBouncer {
        let admin = url::Url::parse(&super::admin_url()).expect("HERALD_TEST_DATABASE_URL");
        let server_port = admin.port().unwrap_or(5432);
        let user = admin.username().to_string();
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!(
            "herald-pgbouncer-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("creating PgBouncer's directory");
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).expect("users.txt");
        std::fs::write(
            dir.join("pgbouncer.ini"),
            edit(ini(port, &dir, database, server_port)),
        )
        .expect("pgbouncer.ini");
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = std::process::Command::new(
            ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or("pgbouncer"),
        );
        if root {
            let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
            assert!(!pw.is_null(), "running as root needs a postgres user");
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            for entry in ["", "users.txt", "pgbouncer.ini"] {
                std::os::unix::fs::chown(dir.join(entry), Some(uid), Some(gid))
                    .expect("chown to postgres");
            }
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer installed (apt-get install pgbouncer)");
        let bouncer = PgBouncer { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start: {}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of `alias` ([`TRANSACTION`] or [`SESSION`]).
    pub fn url(&self, alias: &str) -> String {
        let mut url = url::Url::parse(&super::admin_url()).expect("HERALD_TEST_DATABASE_URL");
        url.set_port(Some(self.port)).expect("a port");
        url.set_path(&format!("/{alias}"));
        url.to_string()
    }

    /// `config` pointed at `alias`.
    pub fn config(&self, config: &Config, alias: &str) -> Config {
        Config {
            database_url: self.url(alias),
            ..config.clone()
        }
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
