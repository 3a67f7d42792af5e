// Command image builds lazycas's OCI image without a container engine:
// one layer holding the static daemon and CLI binaries and a CA bundle,
// written as an OCI image layout in a tar archive that `ctr images import`
// (and containerd's client Import) accepts. `make image` runs it.
//
// The output is a function of its inputs: every timestamp in the layer and
// the config is fixed (SOURCE_DATE_EPOCH, or 0), entries are written in a
// fixed order with root ownership, so the same binaries always give the
// same image digest.
package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/distribution/reference"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Where the image puts things; the manifests in script/deploy name them.
const (
	binDir     = "usr/local/bin"
	daemonName = "containerd-lazycas-grpc"
	cliName    = "lazycas"
	caPath     = "etc/ssl/certs/ca-certificates.crt"
	configPath = "/etc/lazycas/config.toml"
)

// annotationImageName is containerd's index annotation naming an image on
// import (images.AnnotationImageName; not imported to keep this program's
// dependencies to the image libraries).
const annotationImageName = "io.containerd.image.name"

func main() {
	var (
		daemon  = flag.String("daemon", "bin/image/"+daemonName, "the daemon binary (static: CGO_ENABLED=0)")
		cli     = flag.String("cli", "bin/image/"+cliName, "the CLI binary (static: CGO_ENABLED=0)")
		ca      = flag.String("ca", "/etc/ssl/certs/ca-certificates.crt", "CA bundle for TLS registries; \"\" for none")
		version = flag.String("version", "dev", "the version: image label, and the tag's default")
		tag     = flag.String("tag", "", "image name (default lazycas:<version>)")
		arch    = flag.String("arch", runtime.GOARCH, "the binaries' architecture")
		out     = flag.String("out", "bin/lazycas-image.tar", "the OCI archive to write")
	)
	flag.Parse()
	if *tag == "" {
		*tag = "lazycas:" + *version
	}
	start := time.Now()
	digest, err := build(options{daemon: *daemon, cli: *cli, ca: *ca, version: *version, tag: *tag, arch: *arch, out: *out})
	if err != nil {
		fmt.Fprintf(os.Stderr, "image: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s: %s (%s) in %s\n", *out, *tag, digest, time.Since(start).Round(time.Millisecond))
}

type options struct {
	daemon, cli, ca, version, tag, arch, out string
}

// epoch is the one timestamp the image carries.
func epoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: want seconds since 1970", s)
	}
	return time.Unix(n, 0).UTC(), nil
}

func build(o options) (v1.Hash, error) {
	named, err := reference.ParseNormalizedNamed(o.tag)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("tag %q: %w", o.tag, err)
	}
	tagged, ok := named.(reference.Tagged)
	if !ok {
		return v1.Hash{}, fmt.Errorf("tag %q names no tag (want NAME:TAG)", o.tag)
	}
	when, err := epoch()
	if err != nil {
		return v1.Hash{}, err
	}
	for _, b := range []string{o.daemon, o.cli} {
		if err := checkStatic(b); err != nil {
			return v1.Hash{}, err
		}
	}
	layerTar, err := rootfs(o, when)
	if err != nil {
		return v1.Hash{}, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return v1.Hash{}, fmt.Errorf("layer: %w", err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	created := v1.Time{Time: when}
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, MediaType: types.OCILayer,
		History: v1.History{Created: created, CreatedBy: "lazycas script/image", Comment: "lazycas " + o.version}})
	if err != nil {
		return v1.Hash{}, fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return v1.Hash{}, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", o.arch, created
	labels := map[string]string{
		ocispec.AnnotationVersion: o.version,
		ocispec.AnnotationTitle:   "lazycas",
		ocispec.AnnotationSource:  "https://github.com/lazycas/lazycas",
	}
	cf.Config = v1.Config{
		// The daemon; the holder DaemonSet runs the same binary with the
		// fuse-holder command as its args.
		Entrypoint: []string{"/" + binDir + "/" + daemonName},
		Cmd:        []string{"--config", configPath},
		Env:        []string{"PATH=/" + binDir + ":/usr/bin:/bin"},
		WorkingDir: "/",
		Labels:     labels,
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return v1.Hash{}, fmt.Errorf("config: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return v1.Hash{}, err
	}
	annotations := map[string]string{
		annotationImageName:       named.String(),
		ocispec.AnnotationRefName: tagged.Tag(),
	}
	if err := writeArchive(o.out, img, annotations, when); err != nil {
		return v1.Hash{}, err
	}
	return digest, nil
}

// checkStatic refuses a dynamically linked binary: the image has no libc,
// and such a binary would only fail when the pod starts.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("binary %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("binary %s is dynamically linked: build it with CGO_ENABLED=0", path)
		}
	}
	return nil
}

// rootfs is the layer's tar: directories first, parents before children.
func rootfs(o options, when time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := func(name string, mode int64) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, ModTime: when,
			Uname: "root", Gname: "root", Format: tar.FormatPAX})
	}
	file := func(name, src string, mode int64) error {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)),
			ModTime: when, Uname: "root", Gname: "root", Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err = tw.Write(data)
		return err
	}
	// /tmp for anything that wants a temporary file; /etc/lazycas is where
	// the ConfigMap is mounted; /run/lazycas and /var/lib/lazycas are host
	// paths, present here so that the image also runs without them.
	for _, d := range []struct {
		name string
		mode int64
	}{{"etc", 0o755}, {"etc/lazycas", 0o755}, {"etc/ssl", 0o755}, {"etc/ssl/certs", 0o755}, {"run", 0o755},
		{"run/lazycas", 0o711}, {"tmp", 0o1777}, {"usr", 0o755}, {"usr/local", 0o755}, {binDir, 0o755},
		{"var", 0o755}, {"var/lib", 0o755}, {"var/lib/lazycas", 0o700}} {
		if err := dir(d.name, d.mode); err != nil {
			return nil, err
		}
	}
	if o.ca != "" {
		if err := file(caPath, o.ca, 0o644); err != nil {
			return nil, fmt.Errorf("CA bundle (-ca \"\" for none): %w", err)
		}
	}
	for _, f := range []struct{ name, src string }{{daemonName, o.daemon}, {cliName, o.cli}} {
		if err := file(binDir+"/"+f.name, f.src, 0o755); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeArchive writes img as an OCI image layout (oci-layout, index.json,
// blobs/sha256/...) in a tar at path, through a temporary file renamed
// into place.
func writeArchive(path string, img v1.Image, annotations map[string]string, when time.Time) (err error) {
	manifest, err := img.RawManifest()
	if err != nil {
		return err
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	mt, err := img.MediaType()
	if err != nil {
		return err
	}
	index, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{{MediaType: string(mt), Digest: digest.FromBytes(manifest), Size: int64(len(manifest)),
			Annotations: annotations}},
	})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	tw := tar.NewWriter(tmp)
	put := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)),
			ModTime: when, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: when, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	if err := put(ocispec.ImageLayoutFile, []byte(`{"imageLayoutVersion":"`+ocispec.ImageLayoutVersion+`"}`)); err != nil {
		return err
	}
	for _, l := range layers {
		if err := putLayer(tw, l, when); err != nil {
			return err
		}
	}
	if err := put(blobPath(digest.FromBytes(config)), config); err != nil {
		return err
	}
	if err := put(blobPath(digest.FromBytes(manifest)), manifest); err != nil {
		return err
	}
	if err := put("index.json", index); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func putLayer(tw *tar.Writer, l v1.Layer, when time.Time) error {
	d, err := l.Digest()
	if err != nil {
		return err
	}
	size, err := l.Size()
	if err != nil {
		return err
	}
	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "blobs/sha256/" + d.Hex, Mode: 0o644, Size: size,
		ModTime: when, Format: tar.FormatPAX}); err != nil {
		return err
	}
	n, err := io.Copy(tw, rc)
	if err == nil && n != size {
		err = errors.New("layer size changed while writing")
	}
	if err != nil {
		return fmt.Errorf("layer %s: %w", d, err)
	}
	return nil
}

func blobPath(d digest.Digest) string { return "blobs/" + d.Algorithm().String() + "/" + d.Encoded() }
