//! What the CA service accepts in a CSR before it signs anything: a PEM
//! PKCS#10 request whose signature verifies (the asker holds the private
//! key), a key of a kind and size TLS 1.3 peers accept (ECDSA P-256 or
//! P-384, RSA of 2,048 to 8,192 bits, Ed25519), and exactly one SAN: the
//! URI of the identity being asked for. The certificate is then built
//! from the public key and that identity alone, so nothing else a CSR
//! asks for can reach it.

use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_SIG_ED25519,
    },
    prelude::FromDer,
    public_key::PublicKey,
};

/// Largest CSR accepted, PEM: an RSA-8192 request is about 3.5 KB.
pub const MAX_CSR_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    #[error("the CSR is not PEM ({0})")]
    Pem(String),
    #[error("the CSR is not a PKCS#10 request ({0})")]
    Der(String),
    #[error("the CSR's signature does not verify")]
    Signature,
    #[error("the CSR's key: {0}")]
    Key(String),
    #[error("the CSR's names: {0}")]
    Names(String),
    #[error("the CSR asks for a CA certificate")]
    Ca,
}

/// Checks `pem` as a request for `identity` (a SPIFFE URI); returns the
/// public key to certify (its SubjectPublicKeyInfo, DER).
pub fn check(pem: &str, identity: &str) -> Result<Vec<u8>, CsrError> {
    if pem.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge);
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    if !matches!(
        pem.label.as_str(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(CsrError::Pem(format!("a {} block", pem.label)));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der("bytes after the request".into()));
    }
    let info = &csr.certification_request_info;
    // The key first: the verifier refuses weak keys too, but would call it
    // a bad signature.
    check_key(&info.subject_pki)?;
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let mut uris = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(*uri),
                        other => {
                            return Err(CsrError::Names(format!("{other} is not allowed")));
                        }
                    }
                }
            }
            ParsedExtension::BasicConstraints(constraints) if constraints.ca => {
                return Err(CsrError::Ca);
            }
            _ => {}
        }
    }
    match uris.as_slice() {
        [uri] if *uri == identity => Ok(info.subject_pki.raw.to_vec()),
        [] => Err(CsrError::Names(format!("no URI SAN; {identity} expected"))),
        [uri] => Err(CsrError::Names(format!("{uri}, not {identity}"))),
        more => Err(CsrError::Names(format!(
            "{} URI SANs; only {identity} may be asked for",
            more.len()
        ))),
    }
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(curve) if curve == OID_EC_P256 || curve == OID_NIST_EC_P384 => Ok(()),
            Some(curve) => Err(CsrError::Key(format!(
                "EC curve {curve} is not P-256 or P-384"
            ))),
            None => Err(CsrError::Key("EC key without a named curve".into())),
        };
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(CsrError::Key("an RSA key that does not parse".into()));
        };
        let bits = rsa.key_size();
        return if (2048..=8192).contains(&bits) {
            Ok(())
        } else {
            Err(CsrError::Key(format!(
                "RSA of {bits} bits; 2048 to 8192 accepted"
            )))
        };
    }
    if *algorithm == OID_SIG_ED25519 {
        return Ok(());
    }
    Err(CsrError::Key(format!(
        "algorithm {algorithm} is not accepted"
    )))
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P384_SHA384, SanType};

    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

    fn csr(key: &KeyPair, names: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(text: &str) -> SanType {
        SanType::URI(text.try_into().unwrap())
    }

    #[test]
    fn a_request_for_exactly_the_identity_passes_with_its_key() {
        let key = KeyPair::generate().unwrap();
        assert_eq!(
            check(&csr(&key, vec![uri(ID)]), ID),
            Ok(key.public_key_der())
        );
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(check(&csr(&p384, vec![uri(ID)]), ID).is_ok());
        let rsa = include_str!("testdata/rsa2048.csr");
        assert!(check(rsa, ID).is_ok(), "{:?}", check(rsa, ID));
    }

    #[test]
    fn other_names_more_names_or_none_are_refused() {
        let key = KeyPair::generate().unwrap();
        let other = "spiffe://cluster.local/ns/shop/sa/admin";
        for (names, expected) in [
            (vec![uri(other)], "not spiffe"),
            (vec![uri(ID), uri(other)], "2 URI SANs"),
            (
                vec![uri(ID), SanType::DnsName("api.shop".try_into().unwrap())],
                "not allowed",
            ),
            (
                vec![uri(ID), SanType::IpAddress([10, 0, 0, 1].into())],
                "not allowed",
            ),
            (vec![], "no URI SAN"),
        ] {
            let error = check(&csr(&key, names), ID).unwrap_err();
            assert!(
                matches!(&error, CsrError::Names(m) if m.contains(expected)),
                "{error}"
            );
        }
    }

    /// `der` as a PEM block labelled as a CSR (or not).
    fn pem_of(der: &[u8], request: bool) -> String {
        let label = if request {
            "CERTIFICATE REQUEST"
        } else {
            "CERTIFICATE"
        };
        pem::encode(&pem::Pem::new(label, der.to_vec()))
    }

    #[test]
    fn weak_keys_bad_signatures_and_garbage_are_refused() {
        let weak = include_str!("testdata/rsa1024.csr");
        assert_eq!(
            check(weak, ID),
            Err(CsrError::Key(
                "RSA of 1024 bits; 2048 to 8192 accepted".into()
            ))
        );
        let key = KeyPair::generate().unwrap();
        let good = csr(&key, vec![uri(ID)]);
        let der = pem::parse(&good).unwrap().into_contents();
        assert!(check(&pem_of(&der, true), ID).is_ok());
        // One bit of the signature (the request's last byte) flipped.
        let mut tampered = der.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            check(&pem_of(&tampered, true), ID),
            Err(CsrError::Signature)
        );
        assert!(matches!(check("not a CSR", ID), Err(CsrError::Pem(_))));
        assert!(matches!(
            check(&pem_of(b"\x30\x03\x02\x01\x00", true), ID),
            Err(CsrError::Der(_))
        ));
        assert!(matches!(
            check(&pem_of(&der, false), ID),
            Err(CsrError::Pem(m)) if m.contains("CERTIFICATE block")
        ));
        assert_eq!(
            check(&"A".repeat(MAX_CSR_LEN + 1), ID),
            Err(CsrError::TooLarge)
        );
    }
}
