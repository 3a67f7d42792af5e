package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/service"
)

// A start-up profile travels with its image as an OCI artifact whose
// subject is the image's manifest: a registry with the referrers API lists
// it there, any other under the referrers tag sha256-<digest> (the
// registry client keeps that index up to date when it pushes). The
// artifact's one layer is a profile export holding the profiles of the
// image's layers.
const profileArtifactType = "application/vnd.lazycas.startup-profile.v1+json"

// maxProfileArtifact bounds the export read back from a registry.
const maxProfileArtifact = 64 << 20

// profileRegistryArgs parses the command line of push or pull and
// resolves its REF to this platform's image.
func profileRegistryArgs(ctx context.Context, cmd, what string, args []string, stderr io.Writer) (string, name.Reference, v1.Image, error) {
	flags := flag.NewFlagSet("lazycas image profile "+cmd, flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintf(stderr, "usage: lazycas image profile %s REF: %s\n", cmd, what)
		flags.PrintDefaults()
	}
	address := flags.String("api-address", config.DefaultAPIAddress, "the lazycas daemon's API socket")
	plain := flags.Bool("plain-http", false, "the registry speaks plain HTTP")
	if err := flags.Parse(args); err != nil {
		return "", nil, nil, err
	}
	if flags.NArg() != 1 {
		flags.Usage()
		return "", nil, nil, errUsage
	}
	ref, img, err := imageOf(ctx, flags.Arg(0), *plain)
	return *address, ref, img, err
}

func registryOptions(ctx context.Context) []remote.Option {
	return []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)}
}

// imageOf resolves ref to the image manifest of this platform.
func imageOf(ctx context.Context, ref string, plainHTTP bool) (name.Reference, v1.Image, error) {
	var opts []name.Option
	if plainHTTP {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("reference %q: %w", ref, err)
	}
	img, err := remote.Image(r, registryOptions(ctx)...)
	if err != nil {
		return nil, nil, fmt.Errorf("image %s: %w", ref, err)
	}
	return r, img, nil
}

func profilePush(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	address, ref, img, err := profileRegistryArgs(ctx, "push", "attach the daemon's profiles of REF's layers to REF in its registry", args, stderr)
	if err != nil {
		return err
	}
	m, err := img.Manifest()
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	var all profile.Export
	if err := newAPIClient(address).call(ctx, http.MethodGet, service.APIProfiles, url.Values{}, &all); err != nil {
		return err
	}
	e := profile.Export{Version: profile.FormatVersion}
	for _, p := range all.Profiles {
		if slices.ContainsFunc(m.Layers, func(l v1.Descriptor) bool { return l.Digest.String() == p.Layer.String() }) {
			e.Profiles = append(e.Profiles, p)
		}
	}
	if len(e.Profiles) == 0 {
		return fmt.Errorf("push: the daemon has no profile of any layer of %s (is [fs] learn on, and has a container of it run?)", ref)
	}
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	subject, err := descriptorOf(img)
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	art, err := mutate.Append(mutate.MediaType(empty.Image, types.OCIManifestSchema1),
		mutate.Addendum{Layer: static.NewLayer(data, profileArtifactType)})
	if err != nil {
		return err
	}
	// Without an artifactType field, a referrer's type is its config's
	// media type.
	art = mutate.ConfigMediaType(art, profileArtifactType)
	art, ok := mutate.Subject(art, subject).(v1.Image)
	if !ok {
		return errors.New("push: the profile artifact is not an image manifest")
	}
	d, err := art.Digest()
	if err != nil {
		return err
	}
	if err := remote.Write(ref.Context().Digest(d.String()), art, registryOptions(ctx)...); err != nil {
		return fmt.Errorf("push the profile of %s: %w", ref, err)
	}
	fmt.Fprintf(stdout, "pushed %d profiles of %s as %s@%s\n", len(e.Profiles), ref, ref.Context(), d)
	return nil
}

// descriptorOf is img's manifest descriptor.
func descriptorOf(img v1.Image) (v1.Descriptor, error) {
	d, err := img.Digest()
	if err != nil {
		return v1.Descriptor{}, err
	}
	size, err := img.Size()
	if err != nil {
		return v1.Descriptor{}, err
	}
	mt, err := img.MediaType()
	if err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{MediaType: mt, Digest: d, Size: size}, nil
}

func profilePull(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	address, ref, img, err := profileRegistryArgs(ctx, "pull", "import the profiles attached to REF in its registry", args, stderr)
	if err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	idx, err := remote.Referrers(ref.Context().Digest(d.String()), append(registryOptions(ctx),
		remote.WithFilter("artifactType", profileArtifactType))...)
	if err != nil {
		return fmt.Errorf("referrers of %s: %w", ref, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return fmt.Errorf("referrers of %s: %w", ref, err)
	}
	c := newAPIClient(address)
	imported := 0
	for _, desc := range im.Manifests {
		// The referrers tag lists every referrer: filter here as well.
		if desc.ArtifactType != profileArtifactType {
			continue
		}
		data, err := profileArtifact(ctx, ref.Context().Digest(desc.Digest.String()))
		if err != nil {
			return err
		}
		var res service.ProfileImport
		if err := c.send(ctx, http.MethodPost, service.APIProfiles, data, &res); err != nil {
			return err
		}
		imported += res.Imported
	}
	if imported == 0 {
		return fmt.Errorf("pull: no start-up profile is attached to %s", ref)
	}
	fmt.Fprintf(stdout, "imported %d profiles attached to %s\n", imported, ref)
	return nil
}

// profileArtifact reads and checks the export an artifact carries.
func profileArtifact(ctx context.Context, ref name.Digest) ([]byte, error) {
	art, err := remote.Image(ref, registryOptions(ctx)...)
	if err != nil {
		return nil, fmt.Errorf("profile artifact %s: %w", ref, err)
	}
	layers, err := art.Layers()
	if err != nil || len(layers) != 1 {
		return nil, fmt.Errorf("profile artifact %s: want one layer (%d, %v)", ref, len(layers), err)
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		return nil, fmt.Errorf("profile artifact %s: %w", ref, err)
	}
	defer rc.Close()
	// The registry client checks the blob's digest as it reads it.
	data, err := io.ReadAll(io.LimitReader(rc, maxProfileArtifact+1))
	if err != nil {
		return nil, fmt.Errorf("profile artifact %s: %w", ref, err)
	}
	if len(data) > maxProfileArtifact {
		return nil, fmt.Errorf("profile artifact %s: larger than %d bytes", ref, maxProfileArtifact)
	}
	var e profile.Export
	if err := json.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("profile artifact %s: %w: %w", ref, profile.ErrInvalid, err)
	}
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("profile artifact %s: %w", ref, err)
	}
	return data, nil
}
