// Package cri serves Kubernetes' CRI image service in front of
// containerd's, so that the credentials kubelet pulls an image with (its
// pull secrets) reach lazycas too: containerd uses them for the pull and
// forgets them, but a lazy layer reads from the registry for as long as it
// is mounted. Kubelet is pointed at the proxy with
// --image-service-endpoint; every call goes on to containerd unchanged,
// and a pull's credentials are kept in a Keyring by registry and
// repository, in memory only.
package cri

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Proxy is the image service: it answers kubelet by asking containerd.
type Proxy struct {
	runtime.UnimplementedImageServiceServer

	keys    *Keyring
	conn    *grpc.ClientConn
	backend runtime.ImageServiceClient

	pulls, pullErrors, kept atomic.Int64
}

// Stats counts the pulls the proxy passed on.
type Stats struct {
	// Pulls and PullErrors count PullImage calls and those containerd
	// failed.
	Pulls, PullErrors int64
	// WithCredentials counts pulls whose credentials were kept.
	WithCredentials int64
	// Repositories is how many repositories have unexpired credentials.
	Repositories int
}

// NewProxy returns a proxy to the CRI image service on containerd's unix
// socket address. It connects on the first call, so containerd may start
// after lazycas.
func NewProxy(address string, keys *Keyring) (*Proxy, error) {
	conn, err := grpc.NewClient("unix://"+address,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Image lists of big nodes exceed gRPC's 4 MiB default; kubelet
		// allows 16 MiB.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, fmt.Errorf("cri proxy to %s: %w", address, err)
	}
	return &Proxy{keys: keys, conn: conn, backend: runtime.NewImageServiceClient(conn)}, nil
}

// Register adds the image service to srv.
func (p *Proxy) Register(srv *grpc.Server) { runtime.RegisterImageServiceServer(srv, p) }

// Close drops the connection to containerd.
func (p *Proxy) Close() error { return p.conn.Close() }

// Stats returns the proxy's counters.
func (p *Proxy) Stats() Stats {
	return Stats{Pulls: p.pulls.Load(), PullErrors: p.pullErrors.Load(), WithCredentials: p.kept.Load(), Repositories: p.keys.Len()}
}

// PullImage keeps the pull's credentials, then lets containerd pull: the
// lazy layers containerd mounts during the pull already read with them.
func (p *Proxy) PullImage(ctx context.Context, req *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	p.pulls.Add(1)
	image := req.GetImage().GetImage()
	logger := log.G(ctx).WithField("image", image)
	undo, err := p.keys.Put(image, req.GetAuth())
	switch {
	case errors.Is(err, ErrNothingKept):
	case err != nil:
		// containerd judges the pull; lazy reads fall back to the node's
		// docker config. Never the credentials themselves in the log.
		logger.WithError(err).Warn("cri: credentials of this pull not kept for lazy reads")
	default:
		p.kept.Add(1)
	}
	resp, err := p.backend.PullImage(ctx, req)
	if err != nil {
		p.pullErrors.Add(1)
		undo()
		return nil, err
	}
	logger.WithField("ref", resp.GetImageRef()).Debug("cri: pulled")
	return resp, nil
}

func (p *Proxy) ListImages(ctx context.Context, req *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return p.backend.ListImages(ctx, req)
}

func (p *Proxy) ImageStatus(ctx context.Context, req *runtime.ImageStatusRequest) (*runtime.ImageStatusResponse, error) {
	return p.backend.ImageStatus(ctx, req)
}

func (p *Proxy) RemoveImage(ctx context.Context, req *runtime.RemoveImageRequest) (*runtime.RemoveImageResponse, error) {
	return p.backend.RemoveImage(ctx, req)
}

func (p *Proxy) ImageFsInfo(ctx context.Context, req *runtime.ImageFsInfoRequest) (*runtime.ImageFsInfoResponse, error) {
	return p.backend.ImageFsInfo(ctx, req)
}

// StreamImages passes containerd's stream on; a containerd without it
// answers Unimplemented, which kubelet takes as "use ListImages".
func (p *Proxy) StreamImages(req *runtime.StreamImagesRequest, out grpc.ServerStreamingServer[runtime.StreamImagesResponse]) error {
	in, err := p.backend.StreamImages(out.Context(), req)
	if err != nil {
		return err
	}
	for {
		msg, err := in.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := out.Send(msg); err != nil {
			return err
		}
	}
}
