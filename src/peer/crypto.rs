//! The WebRTC stack's cryptography: DTLS through dimpl with its RustCrypto backend for the
//! handshake (ECDHE, ECDSA, hashes), but ring's AES-GCM and ChaCha20-Poly1305 for the records
//! (the data path: ring's assembly keeps the tunnel as fast as it was with aws-lc, RustCrypto's
//! AES-GCM cost a third of the throughput; ring is linked anyway, for wss://); our own
//! self-signed ECDSA P-256 certificate (x509-cert's builder, in place of dimpl's rcgen helper,
//! which would link aws-lc, a second C crypto library of ~0.85 MB); HMAC-SHA1 for STUN, SHA-256
//! for fingerprints, and the SRTP ciphers str0m sets up after the handshake (a data channel
//! never uses them, but str0m derives the keys). `provider()` is handed to every `Rtc` the peer
//! core builds.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dimpl::crypto::{
    Cipher as DtlsCipher, Dtls12CipherSuite, HashAlgorithm, SupportedDtls12CipherSuite,
};
use ring::aead;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockEncrypt, KeyInit, KeyIvInit, StreamCipher};
use aes_gcm::aead::{AeadInPlace, Nonce};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use hmac::{Hmac, Mac};
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::EncodePrivateKey;
use sha2::{Digest, Sha256};
use str0m::crypto::CryptoProvider;
use str0m_proto::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, ProtocolVersion,
};
use str0m_proto::crypto::{
    AeadAes128GcmCipher, AeadAes256GcmCipher, Aes128CmSha1_80Cipher, CryptoError, DtlsVersion,
    Sha1HmacProvider, Sha256Provider, SrtpProvider, SupportedAeadAes128Gcm, SupportedAeadAes256Gcm,
    SupportedAes128CmSha1_80,
};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::Encode;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

/// The crypto provider for str0m.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                srtp_provider: &Srtp,
                sha1_hmac_provider: &HmacSha1,
                sha256_provider: &Sha256Hash,
                dtls_provider: &Dtls,
            })
        })
        .clone()
}

/// A fresh self-signed ECDSA P-256 certificate (DER) and its key (PKCS#8 DER), valid for a
/// year from now, with a random 127-bit serial number (Firefox refuses two certificates with one
/// issuer and serial).
pub fn self_signed_certificate() -> Result<DtlsCert, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("certificate: {what}: {e}");
    let mut seed = [0u8; 32];
    let key = loop {
        getrandom::getrandom(&mut seed).map_err(|e| fail("random", &e))?;
        // All but a negligible share of 32-byte strings are valid scalars.
        if let Ok(key) = SigningKey::from_slice(&seed) {
            break key;
        }
    };
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| fail("random", &e))?;
    serial[0] &= 0x7f; // positive
    serial[0] |= 0x40; // and of full length
    let serial = SerialNumber::new(&serial).map_err(|e| fail("serial", &e))?;
    let validity =
        Validity::from_now(Duration::from_secs(365 * 86_400)).map_err(|e| fail("validity", &e))?;
    let name: Name = "CN=tunnel".parse().map_err(|e| fail("name", &e))?;
    let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key())
        .map_err(|e| fail("public key", &e))?;
    let profile = Profile::Leaf {
        issuer: name.clone(),
        enable_key_agreement: false,
        enable_key_encipherment: false,
    };
    let builder = CertificateBuilder::new(profile, serial, validity, name, spki, &key)
        .map_err(|e| fail("builder", &e))?;
    let cert = builder
        .build::<DerSignature>()
        .map_err(|e| fail("signing", &e))?;
    let pkcs8 = key.to_pkcs8_der().map_err(|e| fail("private key", &e))?;
    Ok(DtlsCert {
        certificate: cert.to_der().map_err(|e| fail("encoding", &e))?,
        private_key: pkcs8.as_bytes().to_vec(),
    })
}

#[derive(Debug)]
struct Dtls;

impl DtlsProvider for Dtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        match self_signed_certificate() {
            Ok(cert) => Some(cert),
            Err(e) => {
                log::error!("{e}");
                None
            }
        }
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let cert = dimpl::DtlsCertificate {
            certificate: cert.certificate.clone(),
            private_key: cert.private_key.clone(),
        };
        // ICE has checked the return path before DTLS starts: no cookie exchange needed. A
        // first flight that arrives before the other side has set up its DTLS is lost: resend
        // after 250 ms rather than dimpl's 1 s (which set-up on loopback paid in about half the
        // tries), with two more doublings so that the handshake still waits ~16 s in all.
        let mut config = dimpl::Config::builder()
            .with_crypto_provider(dtls_crypto())
            .flight_start_rto(Duration::from_millis(250))
            .flight_retries(6)
            .use_server_cookie(false);
        if let Some(mtu) = mtu {
            config = config.mtu(mtu);
        }
        let config = Arc::new(
            config
                .build()
                .map_err(|e| CryptoError::Other(format!("dimpl config: {e}")))?,
        );
        let dtls = match version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => return Err(CryptoError::Other(format!("DTLS version {other}"))),
        };
        Ok(Box::new(DtlsSession(dtls)))
    }
}

/// dimpl's RustCrypto provider with the DTLS 1.2 record ciphers from ring.
fn dtls_crypto() -> dimpl::crypto::CryptoProvider {
    static LIST: OnceLock<Vec<&'static dyn SupportedDtls12CipherSuite>> = OnceLock::new();
    let list = LIST.get_or_init(|| {
        record_suites()
            .iter()
            .map(|s| s as &'static dyn SupportedDtls12CipherSuite)
            .collect()
    });
    dimpl::crypto::CryptoProvider {
        cipher_suites: list,
        ..dimpl::crypto::rust_crypto::default_provider()
    }
}

/// dimpl's RustCrypto DTLS 1.2 suites, in its order of preference, each with ring's AEAD where
/// ring has it.
fn record_suites() -> &'static [RecordSuite] {
    static SUITES: OnceLock<Vec<RecordSuite>> = OnceLock::new();
    SUITES.get_or_init(|| {
        dimpl::crypto::rust_crypto::default_provider()
            .cipher_suites
            .iter()
            .map(|&inner| {
                let suite = inner.suite();
                let ring = if suite == Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256 {
                    Some(&aead::AES_128_GCM)
                } else if suite == Dtls12CipherSuite::ECDHE_ECDSA_AES256_GCM_SHA384 {
                    Some(&aead::AES_256_GCM)
                } else if suite == Dtls12CipherSuite::ECDHE_ECDSA_CHACHA20_POLY1305_SHA256 {
                    Some(&aead::CHACHA20_POLY1305)
                } else {
                    None // PSK's AES-CCM-8: RustCrypto's, never offered by WebRTC peers
                };
                RecordSuite { inner, ring }
            })
            .collect()
    })
}

/// A DTLS 1.2 cipher suite as dimpl's RustCrypto provider describes it, with ring's AEAD for
/// its records where ring has the algorithm.
#[derive(Debug)]
struct RecordSuite {
    inner: &'static dyn SupportedDtls12CipherSuite,
    ring: Option<&'static aead::Algorithm>,
}

impl SupportedDtls12CipherSuite for RecordSuite {
    fn suite(&self) -> Dtls12CipherSuite {
        self.inner.suite()
    }
    fn hash_algorithm(&self) -> HashAlgorithm {
        self.inner.hash_algorithm()
    }
    fn key_lengths(&self) -> (usize, usize, usize) {
        self.inner.key_lengths()
    }
    fn explicit_nonce_len(&self) -> usize {
        self.inner.explicit_nonce_len()
    }
    fn tag_len(&self) -> usize {
        self.inner.tag_len()
    }
    fn min_protected_fragment_len(&self) -> usize {
        self.inner.min_protected_fragment_len()
    }
    fn create_cipher(&self, key: &[u8]) -> Result<Box<dyn DtlsCipher>, dimpl::CryptoError> {
        let Some(algorithm) = self.ring else {
            return self.inner.create_cipher(key);
        };
        let key = aead::UnboundKey::new(algorithm, key).map_err(|_| {
            dimpl::CryptoError::OperationFailed(dimpl::CryptoOperation::CreateCipher)
        })?;
        Ok(Box::new(RecordCipher(aead::LessSafeKey::new(key))))
    }
}

/// One direction's record key. dimpl hands over the full nonce (fixed IV and the record's
/// explicit part or sequence number), unique per record.
struct RecordCipher(aead::LessSafeKey);

impl std::fmt::Debug for RecordCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordCipher")
    }
}

impl DtlsCipher for RecordCipher {
    fn encrypt(
        &mut self,
        data: &mut dimpl::crypto::Buf,
        aad: dimpl::crypto::Aad,
        nonce: dimpl::crypto::Nonce,
    ) -> Result<(), dimpl::CryptoError> {
        let nonce = aead::Nonce::assume_unique_for_key(nonce.0);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, aead::Aad::from(&aad.0[..]), data.as_mut())
            .map_err(|_| dimpl::CryptoError::OperationFailed(dimpl::CryptoOperation::Encrypt))?;
        data.extend_from_slice(tag.as_ref());
        Ok(())
    }

    fn decrypt(
        &mut self,
        data: &mut dimpl::crypto::TmpBuf,
        aad: dimpl::crypto::Aad,
        nonce: dimpl::crypto::Nonce,
    ) -> Result<(), dimpl::CryptoError> {
        let nonce = aead::Nonce::assume_unique_for_key(nonce.0);
        let plain = self
            .0
            .open_in_place(nonce, aead::Aad::from(&aad.0[..]), data.as_mut())
            .map_err(|_| dimpl::CryptoError::OperationFailed(dimpl::CryptoOperation::Decrypt))?
            .len();
        data.truncate(plain);
        Ok(())
    }
}

/// One DTLS session: dimpl's, as str0m's trait object.
struct DtlsSession(dimpl::Dtls);

impl std::fmt::Debug for DtlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DtlsSession")
    }
}

impl DtlsInstance for DtlsSession {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active)
    }
    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }
    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }
    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }
    fn send_application_data(&mut self, data: &[u8]) -> Result<(), DtlsImplError> {
        self.0.send_application_data(data)
    }
    fn is_active(&self) -> bool {
        self.0.is_active()
    }
    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }
    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[derive(Debug)]
struct HmacSha1;

impl Sha1HmacProvider for HmacSha1 {
    fn sha1_hmac(&self, key: &[u8], payloads: &[&[u8]]) -> [u8; 20] {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        for p in payloads {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

#[derive(Debug)]
struct Sha256Hash;

impl Sha256Provider for Sha256Hash {
    fn sha256(&self, data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }
}

/// SRTP: AES-128 in counter mode (the HMAC is str0m's), AES-GCM, and the ECB rounds of the key
/// derivation.
#[derive(Debug)]
struct Srtp;

impl SrtpProvider for Srtp {
    fn aes_128_cm_sha1_80(&self) -> &'static dyn SupportedAes128CmSha1_80 {
        &Srtp
    }
    fn aead_aes_128_gcm(&self) -> &'static dyn SupportedAeadAes128Gcm {
        &Srtp
    }
    fn aead_aes_256_gcm(&self) -> &'static dyn SupportedAeadAes256Gcm {
        &Srtp
    }
    fn srtp_aes_128_ecb_round(&self, key: &[u8], input: &[u8], output: &mut [u8]) {
        ecb_round::<aes::Aes128>(key, input, output)
    }
    fn srtp_aes_256_ecb_round(&self, key: &[u8], input: &[u8], output: &mut [u8]) {
        ecb_round::<aes::Aes256>(key, input, output)
    }
}

/// One 16-byte block in ECB with PKCS#7 padding, as str0m's key derivation expects: 32 bytes
/// out (the block, then the encrypted padding block).
fn ecb_round<C: BlockEncrypt + KeyInit>(key: &[u8], input: &[u8], output: &mut [u8]) {
    let Ok(cipher) = C::new_from_slice(key) else {
        return output.fill(0);
    };
    let mut blocks = [[0u8; 16], [16u8; 16]];
    blocks[0].copy_from_slice(&input[..16]);
    for (block, out) in blocks.iter_mut().zip(output.chunks_mut(16)) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
        out.copy_from_slice(block);
    }
}

impl SupportedAes128CmSha1_80 for Srtp {
    fn create_cipher(&self, key: [u8; 16], _encrypt: bool) -> Box<dyn Aes128CmSha1_80Cipher> {
        Box::new(AesCm(key))
    }
}

/// AES-128 in counter mode: one keystream, so encrypting and decrypting are one operation.
struct AesCm([u8; 16]);

impl std::fmt::Debug for AesCm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesCm")
    }
}

impl Aes128CmSha1_80Cipher for AesCm {
    fn encrypt(&mut self, iv: &[u8; 16], input: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
        let out = out
            .get_mut(..input.len())
            .ok_or_else(|| CryptoError::Other("SRTP output too short".into()))?;
        out.copy_from_slice(input);
        ctr::Ctr128BE::<aes::Aes128>::new(&self.0.into(), iv.into()).apply_keystream(out);
        Ok(())
    }
    fn decrypt(&mut self, iv: &[u8; 16], input: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
        self.encrypt(iv, input, out)
    }
}

impl SupportedAeadAes128Gcm for Srtp {
    fn create_cipher(&self, key: [u8; 16], _encrypt: bool) -> Box<dyn AeadAes128GcmCipher> {
        Box::new(Gcm(Aes128Gcm::new(&key.into())))
    }
}

impl SupportedAeadAes256Gcm for Srtp {
    fn create_cipher(&self, key: [u8; 32], _encrypt: bool) -> Box<dyn AeadAes256GcmCipher> {
        Box::new(Gcm(Aes256Gcm::new(&key.into())))
    }
}

/// AES-GCM (128 or 256): the tag follows the ciphertext.
struct Gcm<A>(A);

impl<A> std::fmt::Debug for Gcm<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gcm")
    }
}

impl<A: AeadInPlace> Gcm<A> {
    fn seal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        let mut buf = input.to_vec();
        self.0
            .encrypt_in_place(Nonce::<A>::from_slice(iv), aad, &mut buf)
            .map_err(|_| CryptoError::Other("AES-GCM encryption failed".into()))?;
        out.get_mut(..buf.len())
            .ok_or_else(|| CryptoError::Other("SRTP output too short".into()))?
            .copy_from_slice(&buf);
        Ok(())
    }

    fn open(
        &self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let aad = aads.concat();
        let mut buf = input.to_vec();
        self.0
            .decrypt_in_place(Nonce::<A>::from_slice(iv), &aad, &mut buf)
            .map_err(|_| CryptoError::Other("AES-GCM authentication failed".into()))?;
        out.get_mut(..buf.len())
            .ok_or_else(|| CryptoError::Other("SRTP output too short".into()))?
            .copy_from_slice(&buf);
        Ok(buf.len())
    }
}

impl AeadAes128GcmCipher for Gcm<Aes128Gcm> {
    fn encrypt(
        &mut self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.seal(iv, aad, input, out)
    }
    fn decrypt(
        &mut self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        self.open(iv, aads, input, out)
    }
}

impl AeadAes256GcmCipher for Gcm<Aes256Gcm> {
    fn encrypt(
        &mut self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.seal(iv, aad, input, out)
    }
    fn decrypt(
        &mut self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        self.open(iv, aads, input, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;
    use x509_cert::der::{Decode, Encode};
    use x509_cert::Certificate;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn certificate_is_self_signed_p256_with_a_fresh_positive_serial() {
        let a = self_signed_certificate().unwrap();
        let b = self_signed_certificate().unwrap();
        assert_ne!(a.certificate, b.certificate);
        let cert = Certificate::from_der(&a.certificate).unwrap();
        let tbs = &cert.tbs_certificate;
        assert_eq!(tbs.issuer, tbs.subject);
        assert_eq!(tbs.subject.to_string(), "CN=tunnel");
        let serial = tbs.serial_number.as_bytes();
        assert!(serial.len() >= 15 && serial[0] & 0x80 == 0, "{serial:?}");
        // The signature verifies with the certificate's own key…
        let key = VerifyingKey::from_sec1_bytes(
            tbs.subject_public_key_info.subject_public_key.raw_bytes(),
        )
        .unwrap();
        let sig = DerSignature::from_bytes(cert.signature.raw_bytes()).unwrap();
        key.verify(&tbs.to_der().unwrap(), &sig).unwrap();
        // …which is the private key's.
        use p256::pkcs8::DecodePrivateKey;
        let private = SigningKey::from_pkcs8_der(&a.private_key).unwrap();
        assert_eq!(private.verifying_key(), &key);
    }

    #[test]
    fn aes_ecb_round_matches_fips_197() {
        let mut out = [0u8; 32];
        let key = hex("000102030405060708090a0b0c0d0e0f");
        let block = hex("00112233445566778899aabbccddeeff");
        Srtp.srtp_aes_128_ecb_round(&key, &block, &mut out);
        assert_eq!(out[..16], hex("69c4e0d86a7b0430d8cdb78070b4c55a")[..]);
        let key = hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        Srtp.srtp_aes_256_ecb_round(&key, &block, &mut out);
        assert_eq!(out[..16], hex("8ea2b7ca516745bfeafc49904b496089")[..]);
    }

    /// RFC 3711 B.2: the AES-CM keystream for its session key and IV.
    #[test]
    fn aes_cm_keystream_matches_rfc_3711() {
        let key: [u8; 16] = hex("2b7e151628aed2a6abf7158809cf4f3c").try_into().unwrap();
        let iv: [u8; 16] = hex("f0f1f2f3f4f5f6f7f8f9fafbfcfd0000").try_into().unwrap();
        let mut cipher = SupportedAes128CmSha1_80::create_cipher(&Srtp, key, true);
        let mut out = [0u8; 48];
        cipher.encrypt(&iv, &[0u8; 48], &mut out).unwrap();
        let want = hex(
            "e03ead0935c95e80e166b16dd92b4eb4d23513162b02d0f72a43a2fe4a5f97ab\
             41e95b3bb0a2e8dd477901e4fca894c0",
        );
        assert_eq!(out[..], want[..]);
    }

    #[test]
    fn aes_gcm_round_trips_and_refuses_a_changed_byte() {
        let mut seal = SupportedAeadAes128Gcm::create_cipher(&Srtp, [7; 16], true);
        let mut open = SupportedAeadAes128Gcm::create_cipher(&Srtp, [7; 16], false);
        let (iv, aad, msg) = ([1u8; 12], [2u8; 12], b"hello, srtp");
        let mut sealed = [0u8; 11 + 16];
        seal.encrypt(&iv, &aad, msg, &mut sealed).unwrap();
        let mut plain = [0u8; 27];
        let n = open
            .decrypt(&iv, &[&aad[..4], &aad[4..]], &sealed, &mut plain)
            .unwrap();
        assert_eq!(&plain[..n], msg);
        sealed[3] ^= 1;
        assert!(open.decrypt(&iv, &[&aad], &sealed, &mut plain).is_err());
        let mut seal = SupportedAeadAes256Gcm::create_cipher(&Srtp, [9; 32], true);
        let mut open = SupportedAeadAes256Gcm::create_cipher(&Srtp, [9; 32], false);
        seal.encrypt(&iv, &aad, msg, &mut sealed).unwrap();
        let n = open.decrypt(&iv, &[&aad], &sealed, &mut plain).unwrap();
        assert_eq!(&plain[..n], msg);
    }

    /// ring's record ciphers and dimpl's RustCrypto ones are interchangeable: what one seals
    /// the other opens, for every suite we replace, and a changed byte is refused.
    #[test]
    fn dtls_record_ciphers_interoperate_with_rustcrypto() {
        assert_eq!(dtls_crypto().cipher_suites.len(), record_suites().len());
        let mut replaced = 0;
        for ours in record_suites().iter().filter(|s| s.ring.is_some()) {
            replaced += 1;
            let key: Vec<u8> = (0..ours.key_lengths().1 as u8).collect();
            let pair = || {
                let ring = ours.create_cipher(&key).unwrap();
                let rust = ours.inner.create_cipher(&key).unwrap();
                (ring, rust)
            };
            let ((ring_seal, rust_open), (ring_open, rust_seal)) = (pair(), pair());
            let aad = || dimpl::crypto::Aad((0..13u8).collect());
            let nonce = dimpl::crypto::Nonce([3; 12]);
            let msg = b"a DTLS record's plaintext";
            for (mut seal, mut open) in [(ring_seal, rust_open), (rust_seal, ring_open)] {
                let mut buf = dimpl::crypto::Buf::new();
                buf.extend_from_slice(msg);
                seal.encrypt(&mut buf, aad(), nonce).unwrap();
                assert_eq!(buf.len(), msg.len() + ours.tag_len());
                let mut bytes = buf.to_vec();
                let mut tmp = dimpl::crypto::TmpBuf::new(&mut bytes);
                open.decrypt(&mut tmp, aad(), nonce).unwrap();
                assert_eq!(tmp.as_ref(), msg);
                let mut bad = buf.to_vec();
                bad[0] ^= 1;
                let mut tmp = dimpl::crypto::TmpBuf::new(&mut bad);
                assert!(open.decrypt(&mut tmp, aad(), nonce).is_err());
            }
        }
        assert_eq!(replaced, 3, "AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305");
    }

    #[test]
    fn hmac_sha1_matches_rfc_2202() {
        let mac = HmacSha1.sha1_hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(mac[..], hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")[..]);
    }
}
