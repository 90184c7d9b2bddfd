//! The authentication layer: a tower layer around every gRPC service of a
//! listener that checks, before a request reaches its method, that the
//! caller may call it.
//!
//! The method's path decides who may call it (`security::tokens::access`):
//! health and reflection are open, `AgentService` checks agents itself, and
//! every `ControlService` method needs a bearer token (`authorization:
//! Bearer <id>.<secret>`) whose role allows it. A listener may admit callers
//! without a token under a role of its own ([`AuthLayer::anonymous`]): the
//! plaintext loopback listener of `--insecure-plaintext` (admin) and the
//! in-process agents' listener of `skymirror dev` (edge). A refusal is
//! UNAUTHENTICATED (no token, or one that is malformed, unknown, expired or
//! revoked) or PERMISSION_DENIED (a role that may not call the method), and
//! names the method and the roles that may.
//!
//! The layer passes the [`Caller`] on to the method in the request's
//! extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::access::{Caller, Refused};
use crate::daemon::Daemon;
use crate::security::{Access, Role, tokens};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    daemon: Arc<Daemon>,
    /// The role of a caller that presents no token on this listener; `None`:
    /// a token is required.
    anonymous: Option<Role>,
}

impl AuthLayer {
    /// The layer of a listener whose callers without a token get `anonymous`.
    pub fn new(daemon: Arc<Daemon>, anonymous: Option<Role>) -> Self {
        AuthLayer { daemon, anonymous }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the gRPC router.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for Auth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.layer.authorize(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The token of an `authorization: Bearer …` header, if there is one.
fn bearer<B>(request: &http::Request<B>) -> Result<Option<&str>, tonic::Status> {
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| tonic::Status::unauthenticated("the authorization header is not text"))?;
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(tonic::Status::unauthenticated(
            "the authorization header must be `Bearer <token>`",
        )),
    }
}

/// `ControlService/Apply` from `/skymirror.v1.ControlService/Apply`.
fn method_name(path: &str) -> &str {
    path.trim_start_matches('/')
        .rsplit_once('.')
        .map_or(path, |(_, m)| m)
}

impl AuthLayer {
    /// Who the caller is, if the method needs to know (`None` for open and
    /// agent methods), or why it may not call.
    fn authorize<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, tonic::Status> {
        let path = request.uri().path();
        let access = tokens::access(path);
        if matches!(access, Access::Open | Access::Agent) {
            return Ok(None);
        }
        let method = method_name(path);
        let peer = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .or_else(|| {
                request
                    .extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<
                        tonic::transport::server::TcpConnectInfo,
                    >>()
                    .and_then(|i| i.get_ref().remote_addr())
            });
        let refuse = |status: tonic::Status| {
            self.daemon.refuse(
                Refused::Call,
                peer,
                "",
                &format!("{method}: {}", status.message()),
            );
            status
        };
        let caller = match bearer(request).map_err(refuse)? {
            None => match self.anonymous {
                Some(role) => Caller {
                    token_id: None,
                    role,
                },
                None => {
                    return Err(refuse(tonic::Status::unauthenticated(format!(
                        "{method} needs a token of role {}: set SKYMIRROR_TOKEN, or a context with a token (skymirror config set-context)",
                        access.describe()
                    ))));
                }
            },
            Some(presented) => {
                let token = self
                    .daemon
                    .authenticate(presented)
                    .map_err(|e| refuse(tonic::Status::unauthenticated(e.to_string())))?;
                Caller {
                    token_id: Some(token.id),
                    role: token.role,
                }
            }
        };
        if !access.allows(caller.role) {
            return Err(refuse(tonic::Status::permission_denied(format!(
                "{method} needs a token of role {}; {} has role {}",
                access.describe(),
                caller.describe(),
                caller.role
            ))));
        }
        Ok(Some(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_headers() {
        let with = |v: &str| {
            http::Request::builder()
                .header(http::header::AUTHORIZATION, v)
                .body(())
                .expect("request")
        };
        assert_eq!(
            bearer(&with("Bearer abc.def")).expect("ok"),
            Some("abc.def")
        );
        assert_eq!(
            bearer(&with("bearer abc.def ")).expect("ok"),
            Some("abc.def")
        );
        assert!(bearer(&with("Basic dXNlcg==")).is_err());
        let none = http::Request::builder().body(()).expect("request");
        assert_eq!(bearer(&none).expect("ok"), None);
        assert_eq!(
            method_name("/skymirror.v1.ControlService/Apply"),
            "ControlService/Apply"
        );
    }
}
