//! The spec grammar, scheme by scheme: each form parses to the spec it
//! says and prints back to text that parses to the same spec; each
//! mistake is an [`Error::BadSpec`] that names it; and a spec whose
//! device is not there fails to open with an error naming it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use super::*;

fn reason(spec: &str) -> String {
    match DeviceSpec::parse(spec) {
        Err(Error::BadSpec { spec: s, reason }) => {
            assert_eq!(s, spec);
            reason
        }
        other => panic!("{spec:?}: expected BadSpec, got {other:?}"),
    }
}

fn round_trip(spec: &DeviceSpec) {
    let text = spec.to_string();
    assert_eq!(&DeviceSpec::parse(&text).unwrap(), spec, "{text}");
}

#[test]
fn mem_specs() {
    assert_eq!(
        DeviceSpec::parse("mem:64M").unwrap(),
        DeviceSpec::Mem {
            size_bytes: 64 << 20,
            block_size: 4096
        }
    );
    let s: DeviceSpec = "mem:1536?bs=512".parse().unwrap();
    assert_eq!(
        s,
        DeviceSpec::Mem {
            size_bytes: 1536,
            block_size: 512
        }
    );
    assert_eq!(s.to_string(), "mem:1536?bs=512");
    round_trip(&s);
    round_trip(&DeviceSpec::parse("mem:1G?bs=4096").unwrap());
    assert_eq!(
        DeviceSpec::parse("mem:1G?bs=4096").unwrap().to_string(),
        "mem:1G"
    );
}

#[test]
fn file_specs() {
    let s = DeviceSpec::parse("file:/tmp/a.img?size=4G&bs=512&qd=64&create=true").unwrap();
    assert_eq!(
        s,
        DeviceSpec::File {
            path: "/tmp/a.img".into(),
            options: FileOptions {
                size_bytes: Some(4 << 30),
                block_size: Some(512),
                queue_depth: Some(64),
                create: Some(true),
                preallocate: None,
            }
        }
    );
    assert_eq!(
        s.to_string(),
        "file:/tmp/a.img?size=4G&bs=512&qd=64&create=true"
    );
    round_trip(&s);
    let plain = DeviceSpec::parse("file:/dev/nvme0n1").unwrap();
    assert_eq!(plain.to_string(), "file:/dev/nvme0n1");
    round_trip(&plain);
    let odd = DeviceSpec::parse("file:/tmp/what%3F%25/x?size=1M").unwrap();
    let DeviceSpec::File { path, .. } = &odd else {
        unreachable!()
    };
    assert_eq!(path, std::path::Path::new("/tmp/what?%/x"));
    round_trip(&odd);
    let utf8 = DeviceSpec::File {
        path: "/tmp/ünï?cödé%".into(),
        options: FileOptions::default(),
    };
    round_trip(&utf8);
    let raw = DeviceSpec::File {
        path: PathBuf::from(OsString::from_vec(b"/tmp/\xff\xfe\n".to_vec())),
        options: FileOptions::default(),
    };
    round_trip(&raw);
}

#[test]
fn nvme_specs() {
    let s = DeviceSpec::parse("nvme:0000:01:00.0").unwrap();
    assert_eq!(
        s,
        DeviceSpec::Nvme {
            addr: PciAddress {
                domain: 0,
                bus: 1,
                device: 0,
                function: 0
            },
            namespace: 1
        }
    );
    round_trip(&s);
    let s = DeviceSpec::parse("nvme:10DE:Af:1f.7/ns=3").unwrap();
    assert_eq!(s.to_string(), "nvme:10de:af:1f.7/ns=3");
    round_trip(&s);
    // No such PCI function here: a clear error naming it, not a panic.
    match s.open() {
        Err(e) => assert!(e.to_string().contains("10de:af:1f.7"), "{e}"),
        Ok(d) => panic!("opened {}", d.name()),
    }
}

#[test]
fn scheme_errors() {
    assert!(reason("").contains("empty spec"));
    assert!(reason("/dev/sda").contains("missing scheme"));
    let r = reason("disk:/dev/sda");
    assert!(
        r.contains("unknown scheme \"disk\"") && r.contains("mem, shm, file, nvme"),
        "{r}"
    );
}

#[test]
fn mem_errors() {
    assert!(reason("mem:").contains("missing size"));
    assert!(reason("mem:lots").contains("does not start with a number"));
    assert!(reason("mem:4Q").contains("unknown unit"));
    assert!(reason("mem:0").contains("must be positive"));
    assert!(reason("mem:1000").contains("not a multiple of the block size 4096"));
    assert!(reason("mem:1000?bs=512").contains("not a multiple of the block size 512"));
    assert!(reason("mem:1M?bs=1024").contains("must be 512 or 4096"));
    let r = reason("mem:1M?qd=4");
    assert!(
        r.contains("unknown option \"qd\" for mem:") && r.contains("known: bs"),
        "{r}"
    );
    assert!(reason("mem:1M?bs").contains("not of the form key=value"));
    assert!(reason("mem:1M?bs=").contains("empty value"));
    assert!(reason("mem:1M?bs=512&bs=512").contains("given twice"));
}

#[test]
fn file_errors() {
    assert!(reason("file:").contains("missing path"));
    assert!(reason("file:?size=1M").contains("missing path"));
    assert!(reason("file:/x?size=big").contains("does not start with a number"));
    assert!(reason("file:/x?size=0").contains("must be positive"));
    assert!(reason("file:/x?size=1000").contains("not a multiple of the block size 512"));
    assert!(reason("file:/x?size=1536&bs=4096").contains("not a multiple of the block size 4096"));
    assert!(reason("file:/x?bs=2048").contains("must be 512 or 4096"));
    assert!(reason("file:/x?qd=0").contains("from 1 to"));
    assert!(reason("file:/x?qd=many").contains("from 1 to"));
    assert!(reason("file:/x?qd=100000").contains("from 1 to"));
    assert!(reason("file:/x?create=yes").contains("must be true or false"));
    assert!(reason("file:/x?create=true").contains("needs size"));
    let r = reason("file:/x?sz=1M");
    assert!(
        r.contains("unknown option \"sz\"") && r.contains("size, bs, qd, create"),
        "{r}"
    );
    assert!(reason("file:/x?size=1M&size=2M").contains("given twice"));
    assert!(reason("file:/x%zz").contains("bad escape"));
    assert!(reason("file:/x%2").contains("bad escape"));
}

#[test]
fn shm_specs() {
    let s = DeviceSpec::parse("shm:/dev/shm/a.img?size=8G&bs=512&create=true").unwrap();
    assert_eq!(
        s,
        DeviceSpec::Shm {
            path: "/dev/shm/a.img".into(),
            options: ShmOptions {
                size_bytes: Some(8 << 30),
                block_size: Some(512),
                create: Some(true),
            }
        }
    );
    assert_eq!(
        s.to_string(),
        "shm:/dev/shm/a.img?size=8G&bs=512&create=true"
    );
    round_trip(&s);
    // Options in another order come back in the canonical one.
    assert_eq!(
        DeviceSpec::parse("shm:/x?create=false&bs=4K&size=1048576")
            .unwrap()
            .to_string(),
        "shm:/x?size=1M&bs=4096&create=false"
    );
    let plain = DeviceSpec::parse("shm:/dev/shm/b.img").unwrap();
    assert_eq!(plain.to_string(), "shm:/dev/shm/b.img");
    round_trip(&plain);
    let odd = DeviceSpec::parse("shm:/dev/shm/what%3F%25?size=1M").unwrap();
    let DeviceSpec::Shm { path, .. } = &odd else {
        unreachable!()
    };
    assert_eq!(path, std::path::Path::new("/dev/shm/what?%"));
    round_trip(&odd);
    round_trip(&DeviceSpec::Shm {
        path: PathBuf::from(OsString::from_vec(b"/tmp/\xff?\n".to_vec())),
        options: ShmOptions::default(),
    });
}

#[test]
fn shm_errors() {
    assert!(reason("shm:").contains("missing path after shm:"));
    assert!(reason("shm:?size=1M").contains("missing path"));
    assert!(reason("shm:/x?size=big").contains("does not start with a number"));
    assert!(reason("shm:/x?size=0").contains("must be positive"));
    assert!(reason("shm:/x?size=1000").contains("not a multiple of the block size 512"));
    assert!(reason("shm:/x?size=1536&bs=4096").contains("not a multiple of the block size 4096"));
    assert!(reason("shm:/x?bs=2048").contains("must be 512 or 4096"));
    assert!(reason("shm:/x?create=yes").contains("must be true or false"));
    assert!(reason("shm:/x?create=true").contains("needs size"));
    let r = reason("shm:/x?qd=4");
    assert!(
        r.contains("unknown option \"qd\" for shm:") && r.contains("known: size, bs, create"),
        "{r}"
    );
    assert!(reason("shm:/x?size=1M&size=2M").contains("given twice"));
    assert!(reason("shm:/x%zz").contains("bad escape"));
}

#[test]
fn nvme_errors() {
    assert!(reason("nvme:").contains("missing PCI address"));
    assert!(reason("nvme:01:00.0").contains("wrong number of ':'"));
    assert!(reason("nvme:0000:01:00").contains("missing '.'"));
    assert!(reason("nvme:000:01:00.0").contains("domain \"000\" is not 4 hex digits"));
    assert!(reason("nvme:0000:1:00.0").contains("bus \"1\" is not 2 hex digits"));
    assert!(reason("nvme:0000:01:0g.0").contains("device \"0g\" is not 2 hex digits"));
    assert!(reason("nvme:0000:01:00.10").contains("function \"10\" is not 1 hex digit"));
    assert!(reason("nvme:0000:01:20.0").contains("above 0x1f"));
    assert!(reason("nvme:0000:01:00.8").contains("above 7"));
    assert!(reason("nvme:0000:01:00.0/nsid=1").contains("expected /ns="));
    assert!(reason("nvme:0000:01:00.0/ns=0").contains("from 1 to"));
    assert!(reason("nvme:0000:01:00.0/ns=x").contains("from 1 to"));
}

#[test]
fn nvme_tcp_specs() {
    let s = DeviceSpec::parse("nvme-tcp:127.0.0.1:4420/nqn.2024-01.io.blobstack:t1").unwrap();
    assert_eq!(
        s,
        DeviceSpec::NvmeTcp {
            target: "127.0.0.1:4420".into(),
            subnqn: "nqn.2024-01.io.blobstack:t1".into(),
            namespace: 1,
            host_nqn: None,
            queue_depth: None,
            digest: TcpDigest::None,
        }
    );
    assert_eq!(
        s.to_string(),
        "nvme-tcp:127.0.0.1:4420/nqn.2024-01.io.blobstack:t1"
    );
    round_trip(&s);
    let full = "nvme-tcp:[fe80::1]:4421/nqn.x:y/ns=2?hostnqn=nqn.2014-08.org.nvmexpress:uuid:1&qd=64&digest=both";
    let s = DeviceSpec::parse(full).unwrap();
    assert_eq!(s.to_string(), full);
    let DeviceSpec::NvmeTcp {
        target,
        namespace,
        queue_depth,
        digest,
        ..
    } = &s
    else {
        unreachable!()
    };
    assert_eq!(
        (target.as_str(), *namespace, *queue_depth, *digest),
        ("[fe80::1]:4421", 2, Some(64), TcpDigest::Both)
    );
    round_trip(&s);
    round_trip(&DeviceSpec::parse("nvme-tcp:target.example:4420/nqn.a?digest=header").unwrap());
    // Nothing listens there: a clear error naming the target, no panic.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    match open_device(&format!("nvme-tcp:127.0.0.1:{port}/nqn.a:b")) {
        Err(e) => assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}"),
        Ok(d) => panic!("opened {}", d.name()),
    }
}

#[test]
fn nvme_tcp_errors() {
    assert!(reason("nvme-tcp:").contains("missing /<subsystem NQN>"));
    assert!(reason("nvme-tcp:10.0.0.1:4420").contains("missing /<subsystem NQN>"));
    assert!(reason("nvme-tcp:10.0.0.1/nqn.a").contains("has no :<port>"));
    assert!(reason("nvme-tcp::4420/nqn.a").contains("is empty"));
    assert!(reason("nvme-tcp:fe80::1:4420/nqn.a").contains("without [brackets]"));
    assert!(reason("nvme-tcp:h:0/nqn.a").contains("from 1 to 65535"));
    assert!(reason("nvme-tcp:h:99999/nqn.a").contains("from 1 to 65535"));
    assert!(reason("nvme-tcp:h:4420/").contains("missing subsystem NQN"));
    assert!(reason("nvme-tcp:h:4420//ns=1").contains("missing subsystem NQN"));
    assert!(reason(&format!("nvme-tcp:h:4420/{}", "n".repeat(224))).contains("1 to 223 bytes"));
    assert!(reason("nvme-tcp:h:4420/nqn.a/nsid=1").contains("expected /ns="));
    assert!(reason("nvme-tcp:h:4420/nqn.a/ns=0").contains("from 1 to"));
    assert!(
        reason("nvme-tcp:h:4420/nqn.a?qd=0").contains("qd=\"0\" is not a number from 1 to 1024")
    );
    assert!(reason("nvme-tcp:h:4420/nqn.a?qd=2000").contains("from 1 to 1024"));
    assert!(reason("nvme-tcp:h:4420/nqn.a?digest=crc").contains("none, header, data or both"));
    assert!(reason("nvme-tcp:h:4420/nqn.a?hostnqn=a\tb").contains("printable ASCII"));
    let r = reason("nvme-tcp:h:4420/nqn.a?bs=512");
    assert!(
        r.contains("unknown option \"bs\" for nvme-tcp:") && r.contains("hostnqn, qd, digest"),
        "{r}"
    );
    assert!(reason("nvme-tcp:h:4420/nqn.a?qd=1&qd=2").contains("given twice"));
    assert!(reason("nvmetcp:h:4420/nqn.a").contains("nvme-tcp"));
}

#[test]
fn open_mem() {
    let dev = open_device("mem:1M?bs=512").unwrap();
    assert_eq!(dev.geometry().block_size, 512);
    assert_eq!(dev.geometry().size_bytes(), 1 << 20);
    assert!(matches!(open_device("mem:x"), Err(Error::BadSpec { .. })));
}
