package publish

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// s3Target is a bucket and key prefix on S3 or an S3-compatible store.
type s3Target struct {
	c      *minio.Client
	bucket string
	prefix string // "" or ending in "/"
	url    string
}

// openS3 opens s3://BUCKET/PREFIX. Credentials come the standard way:
// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN),
// else AWS_PROFILE's entry in the shared credentials file
// (AWS_SHARED_CREDENTIALS_FILE, default ~/.aws/credentials), else the
// EC2/ECS instance role. The endpoint is o.Endpoint, else
// AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS's.
func openS3(u *url.URL, o Options) (*s3Target, error) {
	if u.Host == "" {
		return nil, fmt.Errorf("publish: %s: no bucket; want s3://BUCKET/PREFIX", u)
	}
	ep := o.Endpoint
	for _, v := range []string{"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} {
		if ep == "" {
			ep = os.Getenv(v)
		}
	}
	secure, custom := true, ep != ""
	if ep == "" {
		ep = "s3.amazonaws.com"
	}
	if strings.Contains(ep, "://") {
		eu, err := url.Parse(ep)
		if err != nil || eu.Host == "" || (eu.Scheme != "http" && eu.Scheme != "https") {
			return nil, fmt.Errorf("publish: S3 endpoint %q: want HOST:PORT or http(s)://HOST:PORT", ep)
		}
		secure, ep = eu.Scheme == "https", eu.Host
	}
	region := o.Region
	for _, v := range []string{"AWS_REGION", "AWS_DEFAULT_REGION"} {
		if region == "" {
			region = os.Getenv(v)
		}
	}
	creds := credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{Profile: os.Getenv("AWS_PROFILE")},
		&credentials.IAM{},
	})
	lookup := minio.BucketLookupAuto
	if custom {
		lookup = minio.BucketLookupPath
	}
	c, err := minio.New(ep, &minio.Options{Creds: creds, Secure: secure, Region: region, BucketLookup: lookup})
	if err != nil {
		return nil, fmt.Errorf("publish: S3 endpoint %q: %w", ep, err)
	}
	prefix := strings.Trim(u.Path, "/")
	if prefix != "" {
		if err := validKey(prefix); err != nil {
			return nil, fmt.Errorf("publish: %s: bad prefix", u)
		}
		prefix += "/"
	}
	return &s3Target{c: c, bucket: u.Host, prefix: prefix, url: "s3://" + u.Host + "/" + prefix}, nil
}

func (s *s3Target) String() string { return strings.TrimSuffix(s.url, "/") }

func (s *s3Target) key(k string) (string, error) {
	if err := validKey(k); err != nil {
		return "", err
	}
	return s.prefix + k, nil
}

// s3Err maps a client error: NoSuchKey to ErrNotFound, HTTP statuses to
// statusError (so 5xx are retried and 4xx are not).
func (s *s3Target) s3Err(k string, err error) error {
	if err == nil {
		return nil
	}
	var er minio.ErrorResponse
	if errors.As(err, &er) {
		switch {
		case er.Code == "NoSuchKey" || er.StatusCode == 404:
			return fmt.Errorf("%s/%s: %w (%s)", s, k, ErrNotFound, er.Code)
		case er.StatusCode != 0:
			hint := ""
			if er.StatusCode == 403 {
				hint = " (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and --endpoint)"
			}
			return &statusError{er.StatusCode, fmt.Sprintf("%s/%s: %s: %s%s", s, k, er.Code, er.Message, hint)}
		}
	}
	return fmt.Errorf("%s/%s: %w", s, k, err)
}

func (s *s3Target) Get(ctx context.Context, k string, limit int64) ([]byte, error) {
	key, err := s.key(k)
	if err != nil {
		return nil, err
	}
	obj, err := s.c.GetObject(ctx, s.bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, s.s3Err(k, err)
	}
	defer obj.Close()
	b, err := readObject(obj, limit, s, k, func(err error) error { return s.s3Err(k, err) })
	if err != nil {
		return nil, err
	}
	return b, nil
}

func (s *s3Target) GetRange(ctx context.Context, k string, off, n int64) (io.ReadCloser, error) {
	key, err := s.key(k)
	if err != nil {
		return nil, err
	}
	opts := minio.GetObjectOptions{}
	if err := opts.SetRange(off, off+n-1); err != nil {
		return nil, err
	}
	obj, err := s.c.GetObject(ctx, s.bucket, key, opts)
	if err != nil {
		return nil, s.s3Err(k, err)
	}
	// GetObject is lazy: Stat makes the request and reports a missing key.
	if _, err := obj.Stat(); err != nil {
		obj.Close()
		return nil, s.s3Err(k, err)
	}
	return &exactReader{r: obj, left: n, c: obj}, nil
}

func (s *s3Target) Put(ctx context.Context, k string, r io.Reader, size int64) error {
	key, err := s.key(k)
	if err != nil {
		return err
	}
	// A CDN in front of the bucket may keep every object for good, except
	// the pointer.
	cache := "public, max-age=31536000, immutable"
	if strings.HasSuffix(k, "/latest") {
		cache = "no-cache"
	}
	_, err = s.c.PutObject(ctx, s.bucket, key, r, size, minio.PutObjectOptions{ContentType: "application/octet-stream", CacheControl: cache})
	return s.s3Err(k, err)
}

func (s *s3Target) List(ctx context.Context, prefix string) ([]string, error) {
	var keys []string
	for o := range s.c.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix + prefix}) {
		if o.Err != nil {
			return nil, s.s3Err(prefix, o.Err)
		}
		k := strings.TrimPrefix(o.Key, s.prefix)
		if strings.HasSuffix(k, "/") || path.Dir(k)+"/" != prefix {
			continue
		}
		keys = append(keys, k)
	}
	return keys, nil
}
